"""GPT-2 BPE, offline: tiktoken for speed, a transformers fast tokenizer with the same vocabulary for the Hub.

Both are built from the two OpenAI files shipped in nanogpt_hf/assets/gpt2 (byte-identical to the ones tiktoken
downloads for its `gpt2` encoding); their sha256 is checked on load, as tiktoken itself does.
"""

import functools
import hashlib
import os

from .errors import UserError

__all__ = ["GPT2_EOT", "CHAR_PAD", "CHAR_EOT", "gpt2_files", "gpt2_encoding", "gpt2_hf_tokenizer", "char_tokenizer",
           "char_vocabulary", "portable_tokenizer", "encode_text", "load_tokenizer", "tokenizer_code",
           "tokenizer_signature", "meta_signature", "check_same_vocabulary"]

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
GPT2_EOT = 50256  # <|endoftext|>
CHAR_PAD, CHAR_EOT = "<pad>", "<|endoftext|>"  # the char tokenizer's two special tokens, after the characters
GPT2_SIGNATURE = {"kind": "gpt2", "vocab_size": 50257}  # see tokenizer_signature
GPT2_SHA256 = {  # the `encoder_json_hash` / `vocab_bpe_hash` of tiktoken_ext.openai_public.gpt2
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenisation regex (tiktoken's r50k pattern)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=None)
def gpt2_files():
    """{'encoder.json': path, 'vocab.bpe': path}, each verified against its published sha256."""
    paths = {}
    for name, expected in GPT2_SHA256.items():
        path = os.path.join(ASSETS, "gpt2", name)
        with open(path, "rb") as f:
            actual = hashlib.sha256(f.read()).hexdigest()
        if actual != expected:
            raise UserError(f"{path} is corrupt (sha256 {actual[:12]}..., expected {expected[:12]}...): reinstall nanogpt_hf")
        paths[name] = path
    return paths


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken's `gpt2` encoding built from the shipped files, no download, no cache copy."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    files = gpt2_files()
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # "" = read in place: tiktoken otherwise copies even local files to a cache
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=files["vocab.bpe"], encoder_json_file=files["encoder.json"])
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=50257
    )


def gpt2_hf_tokenizer(model_max_length=1024):
    """transformers' GPT2TokenizerFast with the same vocabulary, ready for batched pipelines (pad = EOT, left)."""
    from transformers import GPT2TokenizerFast

    files = gpt2_files()
    # vocab=/merges= (not vocab_file=/merges_file=, which silently builds an EMPTY tokenizer in transformers 5).
    # Pad token and side go to the constructor: set afterwards, save_pretrained would not write them.
    return GPT2TokenizerFast(vocab=files["encoder.json"], merges=files["vocab.bpe"], model_max_length=model_max_length,
                             pad_token="<|endoftext|>", padding_side="left")


def char_tokenizer(chars, model_max_length=None):
    """nanoGPT's character tokenizer (data/shakespeare_char) as a stock `PreTrainedTokenizerFast`: no remote code.

    Ids 0..n-1 are the characters in nanoGPT's order (`sorted(set(text))`), then `<pad>` (n; left padding for
    batched generation, dropped by skip_special_tokens) and `<|endoftext|>` (n + 1; the end-of-text token that
    generation and lm-evaluation-harness stop on). A character outside the vocabulary encodes as `<pad>`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(chars)}
    vocab.update({CHAR_PAD: len(chars), CHAR_EOT: len(chars) + 1})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=CHAR_PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character a token
    backend.decoder = decoders.Fuse()  # join tokens without the spaces WordLevel would put between them
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=CHAR_PAD, eos_token=CHAR_EOT,
                                   padding_side="left", clean_up_tokenization_spaces=False, **kwargs)


def portable_tokenizer(tokenizer, model_max_length):
    """The tokenizer as transformers loads it without this package (exports, the served folder): a char tokenizer,
    nanogpt-hf 0.1's hand-written class included, rebuilt as the stock one; any other as it is."""
    chars = char_vocabulary(tokenizer)
    return tokenizer if chars is None else char_tokenizer(list(chars), model_max_length=model_max_length)


def char_vocabulary(tokenizer):
    """The characters of a char tokenizer in id order (this version's or the hand-written one of 0.1), else None."""
    if type(tokenizer).__name__ == "NanoGPTCharTokenizer":
        return "".join(tokenizer.itos[i] for i in range(tokenizer.vocab_size))
    from tokenizers import models

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.model, models.WordLevel):
        return None
    vocab, specials = tokenizer.get_vocab(), set(tokenizer.all_special_tokens)
    return "".join(sorted((t for t in vocab if t not in specials), key=vocab.get))


def encode_text(tokenizer, text):
    """Token ids of plain text (special-token strings stay text): tiktoken for GPT-2 BPE (the same ids as the HF
    tokenizer, 4-11x faster), the char vocabulary otherwise. A character the vocabulary lacks is a ValueError."""
    chars = char_vocabulary(tokenizer)
    if chars is None:
        return gpt2_encoding().encode_ordinary(text)
    missing = sorted(set(text) - set(chars))
    if missing:
        raise ValueError(f"character {missing[0]!r} is not in this model's vocabulary of {len(chars)} characters")
    stoi = {ch: i for i, ch in enumerate(chars)}
    return [stoi[ch] for ch in text]


# tokenizer classes this package provides itself: a folder naming them runs no code of its own
OWN_TOKENIZERS = ("NanoGPTCharTokenizer", "PreTrainedTokenizerFast", "GPT2TokenizerFast", "GPT2Tokenizer")


def tokenizer_code(name_or_path):
    """The code files a folder's (or hub id's) tokenizer_config.json names through auto_map, besides this package's
    own tokenizer classes; [] when it names none."""
    from .sources import fetch_file, read_json

    path = fetch_file(name_or_path, "tokenizer_config.json", required=False)
    if path is None or not os.path.exists(path):
        return []
    entries = (read_json(path).get("auto_map") or {}).get("AutoTokenizer") or []
    entries = [entries] if isinstance(entries, str) else entries
    return sorted({e.split(".")[0] + ".py" for e in entries
                   if isinstance(e, str) and e.rsplit(".", 1)[-1] not in OWN_TOKENIZERS})


def load_tokenizer(folder, trust_remote_code=False):
    """The tokenizer saved in a model or data folder (BPE or char), with a clear error where there is none. Code
    the folder names runs only with trust_remote_code=True: our own folders need none (stock classes, and the 0.1
    char tokenizer is this package's class)."""
    import nanogpt_hf  # noqa: F401  registers our classes, so our folders load without their copied code

    from .sources import cache_only_if_hub_unreachable

    with cache_only_if_hub_unreachable(folder):
        return _load_tokenizer(folder, trust_remote_code)


def _load_tokenizer(folder, trust_remote_code):
    from transformers import AutoTokenizer

    code = tokenizer_code(folder)
    if code and not trust_remote_code:
        raise UserError(f"{folder}: its tokenizer is custom code ({', '.join(code)}), which runs only with "
                        f"--trust_remote_code=true: pass it if you trust this source")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: no tokenizer found ({str(e).splitlines()[0]}); save one with tokenizer.save_pretrained") from e


# ---------------------------------------------------------------------------------------------- model vs data
def tokenizer_signature(tokenizer):
    """What must match between a model and its data: the kind of tokenizer and its exact vocabulary."""
    chars = char_vocabulary(tokenizer)
    return dict(GPT2_SIGNATURE) if chars is None else {"kind": "char", "vocab": chars}


def meta_signature(meta):
    """The same signature from a prepared folder's meta.json."""
    if meta.get("tokenizer") == "char":
        return {"kind": "char", "vocab": "".join(meta["itos"][str(i)] for i in range(meta["vocab_size"]))}
    return dict(GPT2_SIGNATURE)


def check_same_vocabulary(model_sig, data_sig, where):
    """One clear error when a model meets data made with another tokenizer or vocabulary."""
    if model_sig != data_sig:
        def describe(sig):
            return "GPT-2 BPE (50257 tokens)" if sig["kind"] == "gpt2" else f"a {len(sig['vocab'])}-character vocabulary"

        raise UserError(f"{where} uses {describe(model_sig)} but the data was prepared with {describe(data_sig)}: "
                        f"prepare the data with the model's tokenizer, or use a model trained on it")
