"""nanoGPT's character-level tokenizer (data/shakespeare_char) as a real transformers tokenizer.

The vocabulary is every character of the training text, sorted (nanoGPT's `chars = sorted(list(set(data)))`),
stored as JSON. One special token, `<pad>`, sits after the characters (id = number of characters) so batched
generation can left-pad without eating a real character: decoding with skip_special_tokens drops only padding.

This file is copied next to saved tokenizers (remote code), so it imports only transformers.
"""

import json
import os

from transformers import PreTrainedTokenizer

__all__ = ["NanoGPTCharTokenizer"]

VOCAB_FILE = "vocab.json"
PAD_TOKEN = "<pad>"


class NanoGPTCharTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, chars=None, pad_token=PAD_TOKEN, **kwargs):
        if chars is None:
            if vocab_file is None:
                raise ValueError("NanoGPTCharTokenizer needs vocab_file (a vocab.json) or chars (the characters)")
            with open(vocab_file, encoding="utf-8") as f:
                stoi = json.load(f)
            chars = [c for c, _ in sorted(stoi.items(), key=lambda kv: kv[1])]
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.itos = dict(enumerate(chars))
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(pad_token=pad_token, **kwargs)

    @classmethod
    def from_text(cls, text, **kwargs):
        """nanoGPT's vocabulary: all the unique characters that occur in the text, sorted."""
        return cls(chars=sorted(set(text)), **kwargs)

    @property
    def vocab_size(self):
        return len(self.stoi)

    def get_vocab(self):
        return {**self.stoi, **self.added_tokens_encoder}

    def _tokenize(self, text, **kwargs):
        return list(text)

    def _convert_token_to_id(self, token):
        if token not in self.stoi:
            raise ValueError(f"character {token!r} is not in this model's vocabulary of {len(self.stoi)} characters")
        return self.stoi[token]

    def _convert_id_to_token(self, index):
        return self.itos[index]

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.stoi, f, ensure_ascii=False)
        return (path,)
