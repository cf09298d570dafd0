"""nanogpt-eval: loss and perplexity of any model on a prepared split, a text file or a dataset; multiple choice
in HellaSwag's format. Deterministic: a full pass in block_size windows, not random batches.

    nanogpt-eval --init_from out-shakespeare-char --dataset shakespeare_char
    nanogpt-eval --init_from gpt2 --dataset openwebtext --batch_size 8
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml -m nanogpt_hf.evaluate --init_from gpt2 --text_file a.txt
    nanogpt-eval --init_from gpt2 --multiple_choice hellaswag_val.jsonl

Windows: the token stream is cut into consecutive windows of block_size + 1 tokens that overlap by one token, so
every token after the first is predicted exactly once, with up to block_size tokens of context. Under
`accelerate launch` the windows are dealt out across processes and the sums reduced.
"""

import argparse
import itertools
import json
import math
import os
import re

import numpy as np
import torch
from torch.nn import functional as F

from .corpus import dataset_dir, read_meta
from .data import check_bin
from .errors import UserError, cli_main
from .fileio import atomic_path, check_writable_place
from .model_io import load_model_and_tokenizer
from .run_dir import RunDir
from .tokenization import char_vocabulary, check_same_vocabulary, encode_text, meta_signature, tokenizer_signature

__all__ = ["main", "evaluate_tokens", "score_multiple_choice", "write_model_card_results"]


def build_parser():
    p = argparse.ArgumentParser(prog="nanogpt-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", required=True, help="an out_dir / model folder, a hub id, or gpt2*")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a prepared dataset: data/<name> (train.bin/val.bin/meta.json)")
    src.add_argument("--data_dir", help="a prepared dataset folder")
    src.add_argument("--text_file", help="a UTF-8 text file, tokenized with the model's tokenizer")
    src.add_argument("--hf_dataset", help="a datasets name or local .jsonl/.parquet files (comma-separated)")
    src.add_argument("--multiple_choice", help="a HellaSwag-format .jsonl (activity_label, ctx_a, ctx_b, ctx, endings, "
                                               "label), scored as --mc_protocol says")
    p.add_argument("--split", default="val", help="prepared datasets: train | val; --hf_dataset: its split name")
    p.add_argument("--text_column", default="text")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--max_tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    p.add_argument("--model_card", action="store_true", help="add the result to the model folder's README.md")
    p.add_argument("--mc_protocol", default="lm-eval", choices=list(MC_PROTOCOLS),
                   help="--multiple_choice scoring: " + "; ".join(f"{k}: {v}" for k, v in MC_PROTOCOLS.items()))
    p.add_argument("--cpu", action="store_true", help="evaluate on the CPU even where a GPU exists")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="run code the model folder or hub id names (a custom tokenizer): only for sources you trust")
    return p


# ------------------------------------------------------------------------------------------ loss / ppl
def _windows(n_tokens, block_size):
    """(start, length) of windows of up to block_size + 1 tokens overlapping by one: each target once."""
    return [(s, min(block_size + 1, n_tokens - s)) for s in range(0, n_tokens - 1, block_size)]


@torch.no_grad()
def evaluate_tokens(model, tokens, block_size, batch_size, accelerator=None):
    """{'loss', 'perplexity', 'tokens'} of a 1-D token array: summed NLL over every predicted token / their count."""
    device = accelerator.device if accelerator else next(model.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    windows = _windows(len(tokens), block_size)[rank::world]
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    windows.sort(key=lambda w: w[1])  # only the last window can be shorter: equal lengths batch together
    for length, same in itertools.groupby(windows, key=lambda w: w[1]):
        same = list(same)
        for i in range(0, len(same), batch_size):
            starts = [s for s, _ in same[i : i + batch_size]]
            batch = torch.stack([torch.from_numpy(np.asarray(tokens[s : s + length], dtype=np.int64)) for s in starts])
            batch = batch.to(device)  # (B, length)
            logits = model(batch[:, :-1], use_cache=False).logits.float()  # (B, length - 1, vocab)
            nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum").double()
            count += batch[:, 1:].numel()
    if accelerator:
        nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    loss = (nll / count).item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count.item())}


def _load_tokens(args, tokenizer):
    if args.dataset or args.data_dir:
        data_dir = args.data_dir or dataset_dir(args.dataset)
        meta = read_meta(data_dir)
        path = os.path.join(data_dir, f"{args.split}.bin")  # its existence was checked before the model loaded
        check_same_vocabulary(tokenizer_signature(tokenizer), meta_signature(meta), "the model")
        return np.memmap(path, dtype=np.uint16, mode="r"), f"{data_dir}/{args.split}.bin"
    if args.text_file:
        from .corpus import read_text

        return np.asarray(_encode(tokenizer, read_text(args.text_file)), dtype=np.int64), args.text_file
    from .corpus import load_documents

    files = [f for f in args.hf_dataset.split(",") if os.path.exists(f)]
    ds = load_documents(None if files else args.hf_dataset, files or None, args.text_column)
    if args.split not in ds:
        raise UserError(f"{args.hf_dataset}: no split {args.split!r} (splits: {', '.join(ds)})")
    # documents end with the end-of-text token, as in GPT-2 BPE training data; char data (Shakespeare) has none
    eot = tokenizer.eos_token_id if char_vocabulary(tokenizer) is None else None
    ids = []
    for text in ds[args.split][args.text_column]:
        ids += _encode(tokenizer, text) + ([eot] if eot is not None else [])
    return np.asarray(ids, dtype=np.int64), args.hf_dataset


def _encode(tokenizer, text):
    try:
        return encode_text(tokenizer, text)
    except ValueError as e:
        raise UserError(f"the text cannot be encoded with the model's tokenizer: {e}") from e


# ------------------------------------------------------------------------------------------ multiple choice
# Two published ways to score HellaSwag, which give different numbers for the same model:
#   lm-eval  lm-evaluation-harness's `hellaswag` task: the context is preprocess(activity_label + ": " + ctx_a + " " +
#            ctx_b.capitalize()), each ending preprocess(ending) after a space ("[title]" -> ". ", other "[...]"
#            removed, double spaces collapsed: WikiHow rows carry them); context and ending are encoded together and
#            split; acc_norm divides by the ending's length in characters.
#   llm.c    Karpathy's llm.c / build-nanogpt hellaswag.py: the raw ctx and " " + raw ending, encoded separately;
#            acc_norm divides by the ending's number of tokens.
MC_PROTOCOLS = {
    "lm-eval": "lm-evaluation-harness's hellaswag task (preprocessed text, acc_norm per character)",
    "llm.c": "llm.c's hellaswag.py (raw ctx and endings, acc_norm per token)",
}


def hellaswag_preprocess(text):
    """lm-evaluation-harness tasks/hellaswag/utils.py preprocess(): WikiHow's bracket artifacts out."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _read_mc(path, protocol="lm-eval"):
    """[(context, [endings], label)] of a HellaSwag-format .jsonl, as the protocol renders them."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist")
    needed = ("activity_label", "ctx_a", "ctx_b", "endings", "label") if protocol == "lm-eval" else ("ctx", "endings", "label")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                missing = [k for k in needed if k not in ex]
                if missing:
                    hint = "; rows with ctx alone are scored by --mc_protocol llm.c" if protocol == "lm-eval" else ""
                    raise UserError(f"{path}:{n}: no {', '.join(missing)} (HellaSwag's fields for the {protocol} "
                                    f"protocol){hint}")
                endings, label = [str(e) for e in ex["endings"]], int(ex["label"])
                if protocol == "lm-eval":
                    context = hellaswag_preprocess(f"{ex['activity_label']}: {ex['ctx_a']} {ex['ctx_b'].capitalize()}")
                    endings = [hellaswag_preprocess(e) for e in endings]
                else:
                    context = str(ex["ctx"])
            except (ValueError, TypeError, AttributeError) as e:
                raise UserError(f"{path}:{n}: expected HellaSwag JSON with ctx (or ctx_a, ctx_b, activity_label), "
                                f"endings and label ({e})") from e
            if not endings or not 0 <= label < len(endings):
                raise UserError(f"{path}:{n}: label {label} does not index the {len(endings)} endings")
            examples.append((context, endings, label))
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def _mc_tokens(tokenizer, context, ending, protocol):
    """(context ids, ending ids, acc_norm's divisor) as the protocol encodes them."""
    if protocol == "llm.c":
        end_ids = _encode(tokenizer, " " + ending)
        return _encode(tokenizer, context), end_ids, len(end_ids)
    # lm-evaluation-harness's _encode_pair: trailing spaces move to the continuation; the pair is encoded whole and
    # split where the context's own encoding ends (a token may straddle the boundary otherwise); HF tokenizer, as it
    # uses (a character a char model lacks becomes its <pad>, as there)
    continuation = " " + ending
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    # verbose=False: no "longer than the specified maximum" warning, the scorer fits the block itself
    whole = tokenizer.encode(context + continuation, add_special_tokens=False, verbose=False)
    ctx_ids = tokenizer.encode(context, add_special_tokens=False, verbose=False)
    return ctx_ids, whole[len(ctx_ids):], len(ending)


@torch.no_grad()
def score_multiple_choice(model, tokenizer, examples, protocol="lm-eval"):
    """acc: argmax of the endings' summed log-likelihood; acc_norm: the same divided by the protocol's length (see
    MC_PROTOCOLS). A context that does not fit the model's block with an ending is cut from the left, as both
    protocols' code does (counted: context_cut). An item with an ending longer than the block cannot be scored
    (lm-evaluation-harness stops on it): it is left out of acc and acc_norm and counted (skipped_too_long)."""
    device = next(model.parameters()).device
    block = model.config.block_size
    correct = correct_norm = skipped = cut = 0
    predictions = []
    for ctx, endings, label in examples:
        encoded = [_mc_tokens(tokenizer, ctx, ending, protocol) for ending in endings]
        if any(len(end_ids) > block for _, end_ids, _ in encoded):
            skipped += 1
            predictions.append({"skipped": "an ending is longer than the model's context", "label": label})
            continue
        cut += any(len(ctx_ids) + len(end_ids) > block + 1 for ctx_ids, end_ids, _ in encoded)
        scores, norms = [], []
        for ctx_ids, end_ids, divisor in encoded:
            ids = (ctx_ids + end_ids)[-(block + 1) :]
            x = torch.tensor([ids], device=device)
            logprobs = F.log_softmax(model(x[:, :-1], use_cache=False).logits.float(), dim=-1)
            token_lp = logprobs.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)[0]
            total = token_lp[-len(end_ids) :].sum().item()
            scores.append(total)
            norms.append(total / max(divisor, 1))
        pred, pred_norm = int(np.argmax(scores)), int(np.argmax(norms))
        correct += pred == label
        correct_norm += pred_norm == label
        predictions.append({"pred": pred, "pred_norm": pred_norm, "label": label, "scores": scores})
    n = len(examples) - skipped
    if n == 0:
        raise UserError(f"every one of the {skipped} items has an ending longer than the model's context of {block} "
                        f"tokens: nothing can be scored")
    return {"protocol": protocol, "acc": correct / n, "acc_norm": correct_norm / n, "examples": n,
            "skipped_too_long": skipped, "context_cut": cut, "predictions": predictions}


# ------------------------------------------------------------------------------------------ model card
def write_model_card_results(folder, title, result):
    """Appends (or replaces) an evaluation section in the folder's README.md."""
    if not os.path.isdir(folder):
        raise UserError(f"--model_card needs a local model folder, not {folder}")
    path = os.path.join(folder, "README.md")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else f"# {os.path.basename(os.path.abspath(folder))}\n"
    marker = f"<!-- nanogpt-eval: {title} -->"
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in result.items() if k != "predictions")
    state = RunDir(folder).latest_state()  # a training run's folder: the iteration its model is (else a plain folder)
    measured = f" (the model of iteration {state['iter_num']})" if state else ""
    section = f"{marker}\n### Evaluation: {title}{measured}\n\n| metric | value |\n|---|---|\n{rows}\n{marker}\n"
    if marker in text:
        start, end = text.index(marker), text.rindex(marker) + len(marker) + 1
        text = text[:start] + section + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def _check_inputs(args):
    """Every input that can be checked without the model, checked first; returns the multiple-choice examples."""
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if args.output and os.path.isdir(args.output):
        raise UserError(f"--output {args.output} is a folder: name a file in it, e.g. "
                        f"{os.path.join(args.output, 'eval.json')}")
    if args.output:
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise UserError(f"--output {args.output}: {folder} is not a folder; create it first")
        check_writable_place(args.output, f"--output {args.output}")
    if args.text_file and not os.path.isfile(args.text_file):
        raise UserError(f"--text_file {args.text_file} does not exist")
    if args.dataset or args.data_dir:
        data_dir = args.data_dir or dataset_dir(args.dataset)
        read_meta(data_dir)
        if not os.path.exists(os.path.join(data_dir, f"{args.split}.bin")):
            raise UserError(f"{os.path.join(data_dir, args.split + '.bin')} does not exist: --split is train or val")
        check_bin(data_dir, args.split, 1)  # empty: one line (the window size is the model's, known later)
    if args.hf_dataset:
        for name in args.hf_dataset.split(","):
            if not os.path.exists(name) and (os.path.splitext(name)[1] or name.startswith((".", "/", "~"))):
                raise UserError(f"--hf_dataset {name}: no such file")
    return _read_mc(args.multiple_choice, args.mc_protocol) if args.multiple_choice else None


@cli_main
def main(argv=None):
    from accelerate import Accelerator

    args = build_parser().parse_args(argv)
    examples = _check_inputs(args)  # before the model loads (which may be a gpt2-xl download)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    model, tokenizer = load_model_and_tokenizer(args.init_from, trust_remote_code=args.trust_remote_code)
    model.eval().to(accelerator.device)
    if args.multiple_choice:
        result = score_multiple_choice(model, tokenizer, examples, args.mc_protocol)
        title = f"multiple choice on {os.path.basename(args.multiple_choice)}, {MC_PROTOCOLS[args.mc_protocol]}"
        if result["skipped_too_long"] or result["context_cut"]:
            accelerator.print(f"note: of {len(examples)} items, {result['skipped_too_long']} left out (an ending longer "
                              f"than the model's context of {model.config.block_size} tokens) and "
                              f"{result['context_cut']} scored with their context cut from the left to fit")
        accelerator.print(json.dumps({k: v for k, v in result.items() if k != "predictions"}))
    else:
        block_size = args.block_size or model.config.block_size
        if not 0 < block_size <= model.config.block_size:
            raise UserError(f"--block_size must be in [1, {model.config.block_size}] for this model")
        tokens, source = _load_tokens(args, tokenizer)
        tokens = tokens[: args.max_tokens] if args.max_tokens else tokens
        if len(tokens) < 2:
            raise UserError(f"{source} has {len(tokens)} tokens: nothing to evaluate")
        result = {"model": args.init_from, "data": source, "block_size": block_size,
                  **evaluate_tokens(model, tokens, block_size, args.batch_size, accelerator)}
        title = f"{os.path.basename(source)} (block {block_size})"
        accelerator.print(json.dumps(result))
    if accelerator.is_main_process:
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
        if args.model_card:
            write_model_card_results(args.init_from, title, result)
    return result


if __name__ == "__main__":
    main()
