"""GGUF export: a model as one file for llama.cpp's GPT-2 architecture (what llama.cpp, Ollama and LM Studio run),
written with ggml's own `gguf` package. transformers reads it back (`from_pretrained(folder, gguf_file=...)`).

The file is GPT-2: biases (zeros where the model has none), learned positions, a tied or untied head, and the
tanh-approximated GELU, which llama.cpp's GPT-2 always computes. A model trained with nanoGPT's exact GELU (the
trainer's default) therefore gives slightly different logits from the file; export_gguf says by how much. Options
GPT-2 cannot compute (rotary positions, RMSNorm, ...) are refused, as for nanogpt-export's GPT-2 folders.

The vocabulary is a GPT-2 BPE one: OpenAI's tokens and merges, or the character vocabulary as byte-level symbols
(' ' is 'Ġ', as in GPT-2) with no merges, its <pad> and <|endoftext|> as control tokens.
"""

import json
import os

import numpy as np
import torch

from .errors import UserError
from .tokenization import char_vocabulary

__all__ = ["export_gguf", "GGUF_DTYPES"]

GGUF_DTYPES = ("f32", "f16", "q8_0")
# Conv1D weights in GPT2LMHeadModel's state dict are (in, out); GGUF stores them (out, in), as nn.Linear does
# (transformers transposes them back when it reads the file: GPT2TensorProcessor)
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def export_gguf(model, tokenizer, dest, dtype="f16"):
    """Writes the model and its tokenizer to the GGUF file dest. Returns notes for the user (one line each)."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(GGUF_DTYPES)}")
    try:
        gpt2 = model.to_gpt2().eval()
    except ValueError as e:
        raise UserError(f"cannot export to GGUF (llama.cpp's GPT-2): {e}") from e
    cfg = model.config
    tokens, types, merges = _vocabulary(tokenizer, cfg.vocab_size, gguf)
    writer = gguf.GGUFWriter(dest, "gpt2")
    writer.add_name(os.path.splitext(os.path.basename(dest))[0])
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(gpt2.config.layer_norm_epsilon)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex (what the inert merge of a char vocabulary needs)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else len(tokens) - 1
    writer.add_bos_token_id(eos)  # GPT-2's: <|endoftext|> both begins and ends a document
    writer.add_eos_token_id(eos)
    if tokenizer.pad_token_id is not None and char_vocabulary(tokenizer) is None:  # a char file's pad slot is inert
        writer.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    state = gpt2.state_dict()
    state["lm_head.weight"] = gpt2.lm_head.weight  # llama.cpp's `output`, written even when tied
    for key, value in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # GPT-2's causal-mask buffers, not weights
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RuntimeError(f"no GGUF name for {key}")
        array = value.detach().float().cpu()
        if key.endswith(_CONV1D):
            array = array.T
        _add(writer, name, array.contiguous().numpy(), dtype, gguf)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    notes = []
    if cfg.activation_function != "gelu_new":
        notes.append(f"note: the model computes {cfg.activation_function!r} GELU, the file GPT-2's tanh one (what "
                     f"llama.cpp's GPT-2 runs): its logits differ by up to {_gelu_gap(model, gpt2):.2g} on a test batch")
    return notes


def _add(writer, name, array, dtype, gguf):
    """A tensor in the file's dtype: matrices (and the embeddings) in f16 or Q8_0 (rows of 32), norms, biases and
    the position table in f32, as llama.cpp's own converter writes them."""
    matrix = array.ndim == 2 and name != "position_embd.weight"
    if dtype == "f32" or not matrix:
        writer.add_tensor(name, array.astype(np.float32))
    elif dtype == "q8_0" and array.shape[-1] % 32 == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)  # its shape: the packed bytes
    else:
        writer.add_tensor(name, array.astype(np.float16))


def _byte_symbols():
    """GPT-2's byte -> printable symbol table (bytes_to_unicode in OpenAI's encoder.py)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def _vocabulary(tokenizer, vocab_size, gguf):
    """(tokens, token types, merges) of a GPT-2 BPE vocabulary with vocab_size entries (the model's rows: GPT-2's
    50257 padded to 50304 get unused tokens)."""
    chars = char_vocabulary(tokenizer)
    vocab = tokenizer.get_vocab()
    specials = set(tokenizer.all_special_tokens)
    tokens, types = [None] * len(vocab), [gguf.TokenType.NORMAL] * len(vocab)
    if chars is not None:
        symbols = _byte_symbols()
        for token, i in vocab.items():
            if token in specials:
                tokens[i], types[i] = token, gguf.TokenType.CONTROL
            elif len(token.encode("utf-8")) == 1:
                tokens[i] = symbols[token.encode("utf-8")[0]]
            else:
                raise UserError(f"the character vocabulary holds {token!r}, which is not ASCII: GGUF's GPT-2 "
                                f"tokenizer would need merges for it; export a GPT-2 folder instead (nanogpt-export)")
        merges = _inert_merge(tokenizer, tokens, types, gguf)
    else:
        for token, i in vocab.items():
            tokens[i] = token
            if token in specials:
                types[i] = gguf.TokenType.CONTROL
        merges = [m if isinstance(m, str) else " ".join(m)
                  for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]]
    if None in tokens or len(tokens) > vocab_size:
        raise UserError(f"the tokenizer's {len(vocab)} tokens do not fit the model's vocabulary of {vocab_size}")
    for i in range(len(tokens), vocab_size):  # the model's padding rows (nanoGPT rounds 50257 up to 50304)
        tokens.append(f"<|unused{i}|>")
        types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types], merges


def _inert_merge(tokenizer, tokens, types, gguf):
    """The one merge a character vocabulary's file carries (llama.cpp refuses a GPT-2 vocabulary without merges,
    GGUF cannot hold an empty list, and a merge must produce a token of the vocabulary): a letter joined to a
    punctuation mark, spelled in the <pad> slot. GPT-2's pre-tokenizer never leaves a letter and a punctuation mark
    in one piece, so the merge never applies, and the slot, written as an unused token (not a special one, which
    would be matched in the text), is never produced: text tokenizes character by character, as the model's own
    tokenizer does. The pad token is for batched generation alone."""
    chars = [(i, t) for i, t in enumerate(tokens) if types[i] == gguf.TokenType.NORMAL]
    letter = next((t for _, t in chars if t.isalpha()), None)
    mark = next((t for _, t in chars if not t.isalnum() and t not in "ĠĊĉč"), None)  # not a blank's symbol
    pad = tokenizer.pad_token_id
    if letter is None or mark is None or pad is None:
        raise UserError("this character vocabulary has no letter, punctuation mark or <pad>: GGUF's GPT-2 tokenizer "
                        "cannot carry it; export a GPT-2 folder instead (nanogpt-export)")
    tokens[pad], types[pad] = letter + mark, gguf.TokenType.UNUSED
    return [f"{letter} {mark}"]


@torch.no_grad()
def _gelu_gap(model, gpt2):
    """The largest logit difference between the model and its GPT-2 form with the tanh GELU, on a fixed batch."""
    x = torch.randint(0, model.config.vocab_size, (2, min(32, model.config.block_size)),
                      generator=torch.Generator().manual_seed(0))
    tanh = type(gpt2)(gpt2.config.__class__.from_dict({**gpt2.config.to_dict(), "activation_function": "gelu_new"}))
    tanh.load_state_dict(gpt2.state_dict())
    return (model.eval()(x).logits - tanh.eval()(x).logits).abs().max().item()
