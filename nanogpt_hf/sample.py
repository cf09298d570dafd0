"""nanogpt-sample: nanoGPT's sample.py on our models, streaming tokens to the terminal as they come.

    nanogpt-sample --out_dir out-shakespeare-char
    nanogpt-sample --init_from gpt2-xl --start "What is the answer to life?" --num_samples 5 --max_new_tokens 100
    nanogpt-sample --out_dir out --start FILE:prompt.txt --top_p 0.9 --stop_at_eot

Sampling is nanoGPT's (temperature, then top-k, optionally top-p), with the KV cache while the context fits
in block_size and nanoGPT's cropped full recompute beyond it, so it runs past block_size. Same seed, same output.
"""

import argparse
import os
import sys

import torch

from .errors import UserError, cli_main
from .hardware import resolve_device
from .model_io import load_model_and_tokenizer
from .tokenization import char_vocabulary, encode_text

__all__ = ["main", "sample_tokens", "read_prompt"]


def build_parser():
    p = argparse.ArgumentParser(prog="nanogpt-sample", description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="out", help="a training out_dir (its HF model folder); used unless --init_from")
    p.add_argument("--init_from", default=None, help="a model folder, a hub id, or gpt2 / gpt2-medium / gpt2-large / gpt2-xl")
    p.add_argument("--start", default="\n", help='the prompt, or "FILE:prompt.txt" to read it from a file')
    p.add_argument("--num_samples", type=int, default=10, help="number of samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=500, help="number of tokens generated in each sample")
    p.add_argument("--temperature", type=float, default=0.8, help="1.0 = no change, < 1.0 = less random")
    p.add_argument("--top_k", type=int, default=None,
                   help="retain only the top_k most likely tokens (0 = all; default 200, capped at the vocabulary)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep the smallest set with this mass")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--stop_at_eot", action="store_true", help="end a sample at <|endoftext|>")
    p.add_argument("--no_stream", action="store_true", help="print each sample when complete instead of token by token")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 linears on the CPU, ~2.6x faster decoding at GPT-2 sizes, slightly "
                        "different samples (nanogpt_hf/quantize.py); slower for tiny models")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="run code the model folder or hub id names (a custom tokenizer): only for sources you trust")
    return p


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[5:]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the prompt file {path}: {e}") from e
    return start


def check_sampling_args(args, vocab_size):
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature} (use a small value like 0.01 for near-greedy)")
    if args.top_k is None:
        args.top_k = min(200, vocab_size)  # nanoGPT's default
    if args.top_k < 0 or args.top_k > vocab_size:
        raise UserError(f"--top_k must be between 0 (off) and the vocabulary size {vocab_size}, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise UserError("--num_samples and --max_new_tokens must be at least 1")


def _filter(logits, top_k, top_p):
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("Inf")
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
        logits[remove.scatter(1, order, remove)] = -float("Inf")
    return logits


@torch.no_grad()
def sample_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Yields one new token id at a time (shape (B, 1)), decoding through the model's key/value cache
    (NanoGPTForCausalLM.decode_logits: past block_size, nanoGPT's cropped recompute of the last block_size tokens)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    for _ in range(max_new_tokens):
        logits = _filter(model.decode_logits(idx, cache) / temperature, top_k, top_p)
        idx_next = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)
        idx = torch.cat((idx, idx_next), dim=1)
        yield idx_next


def _stream_sample(model, tokenizer, prompt_ids, args, generator, device, write):
    """Writes one sample (prompt + continuation) as it is generated; returns its text."""
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    eot = tokenizer.eos_token_id
    new_ids, shown = [], ""
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    write(prompt_text)
    for tok in sample_tokens(model, idx, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, generator):
        token = int(tok)
        if args.stop_at_eot and eot is not None and token == eot:
            break
        new_ids.append(token)
        text = tokenizer.decode(new_ids, skip_special_tokens=True)  # special tokens never printed raw
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            write(text[len(shown):])
            shown = text
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    write(text[len(shown):])
    return prompt_text + text


def generate_samples(args, write=None):
    """The samples as a list of strings (and streamed through write, if given)."""
    source = args.init_from or args.out_dir
    if not args.init_from and not os.path.isfile(os.path.join(args.out_dir, "config.json")):
        raise UserError(f"no model in {args.out_dir} (no config.json): train one first, or pass --init_from")
    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(source, trust_remote_code=args.trust_remote_code)
    check_sampling_args(args, model.config.vocab_size)
    model.eval().to(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        model.to(torch.bfloat16)
    if args.quantize == "int8":
        from .quantize import int8_available, quantize_int8

        if device.type != "cpu" or not int8_available():
            raise UserError(f"--quantize int8 runs on the CPU with torch's int8 matmul ({device.type}, torch "
                            f"{torch.__version__}): drop --quantize, or use --device cpu")
        quantize_int8(model)
    prompt = read_prompt(args.start)
    try:
        # BPE through the HF tokenizer, so `<|endoftext|>` in a prompt is the EOT token (nanoGPT's allowed_special)
        chars = char_vocabulary(tokenizer)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if chars is None else encode_text(tokenizer, prompt)
    except ValueError as e:
        raise UserError(f"the prompt cannot be encoded: {e}") from e
    if not prompt_ids:
        raise UserError("the prompt is empty after encoding: give some text with --start")
    if len(prompt_ids) > model.config.block_size:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens but the model's context is {model.config.block_size}; "
                        f"shorten it")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    write = write or (lambda s: None)
    samples = []
    for _ in range(args.num_samples):
        samples.append(_stream_sample(model, tokenizer, prompt_ids, args, generator, device, write))
        write("\n---------------\n")
    return samples


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)

    def write(s):
        sys.stdout.write(s)
        sys.stdout.flush()

    samples = generate_samples(args, write=None if args.no_stream else write)
    if args.no_stream:
        for s in samples:
            print(s)
            print("---------------")
    return samples


if __name__ == "__main__":
    main()
