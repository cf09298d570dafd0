"""nanoGPT-compatible dataset preparation: train.bin / val.bin (uint16 token ids) plus meta.json.

Three recipes, nanoGPT's:
- `shakespeare_char`: Tiny Shakespeare, character vocabulary, first 90% train / last 10% val.
- `shakespeare`: Tiny Shakespeare, GPT-2 BPE (tiktoken), the same split.
- `openwebtext` (or any `datasets` name, or local txt/jsonl/parquet files): `load_dataset`, nanoGPT's split
  (test_size 0.0005, seed 2357, `test` renamed `val`), tiktoken `encode_ordinary` + EOT per document through
  `Dataset.map(num_proc=...)`, written to a memmap shard by shard so memory stays bounded.

Every bin is written under a temporary name and renamed when complete; meta.json is written last, so a folder
whose meta.json exists holds complete bins. The trainer reads meta.json to refuse bins made with another
tokenizer or vocabulary than the model's.
"""

import argparse
import json
import os
import urllib.request

import numpy as np
from tqdm.auto import tqdm

from .corpus import content_fingerprint, load_documents, read_text, tokenize_batch
from .errors import UserError, cli_main
from .fileio import atomic_path
from .tokenization import ASSETS, GPT2_EOT, char_tokenizer, gpt2_encoding

__all__ = ["prepare_shakespeare_char", "prepare_shakespeare", "prepare_documents", "main"]

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
UINT16_VOCAB = 2**16


# --------------------------------------------------------------------------------------------- writing
def write_bin(path, ids):
    """Writes token ids as uint16 under a temporary name, then renames it into place."""
    ids = np.asarray(ids)
    if ids.size and int(ids.max()) >= UINT16_VOCAB:
        raise UserError(f"{path}: token id {int(ids.max())} does not fit uint16 bins; use a vocabulary under 65,536")
    with atomic_path(path) as tmp:
        ids.astype(np.uint16).tofile(tmp)


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------------------------- reading
def shakespeare_text(data_dir):
    """Tiny Shakespeare: the copy in data_dir, else the one shipped in the package, else nanoGPT's download."""
    for path in (os.path.join(data_dir, "input.txt"), os.path.join(ASSETS, "tinyshakespeare", "input.txt")):
        if os.path.exists(path):
            return read_text(path), path
    path = os.path.join(data_dir, "input.txt")
    os.makedirs(data_dir, exist_ok=True)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r, open(path + ".part", "wb") as f:
            f.write(r.read())
        os.replace(path + ".part", path)
    except OSError as e:
        raise UserError(f"Tiny Shakespeare is not shipped here and the download failed ({e}); put it at {path}") from e
    return read_text(path), SHAKESPEARE_URL


def _split_90_10(text):
    n = len(text)
    return text[: int(n * 0.9)], text[int(n * 0.9) :]


def _check_split(name, ids, source):
    if len(ids) < 2:
        raise UserError(f"{source}: the {name} split has {len(ids)} tokens, too short to train on; give a longer corpus")


# --------------------------------------------------------------------------------------------- recipes
def prepare_shakespeare_char(out_dir, text=None, source=None):
    """nanoGPT's data/shakespeare_char/prepare.py: 65 characters, 1,003,854 train and 111,540 val tokens."""
    if text is None:
        text, source = shakespeare_text(out_dir)
    chars = sorted(set(text))
    if len(chars) >= UINT16_VOCAB:
        raise UserError(f"{source}: {len(chars)} distinct characters do not fit uint16 bins (at most 65,535)")
    stoi = {ch: i for i, ch in enumerate(chars)}
    train, val = _split_90_10(text)
    train_ids = np.fromiter((stoi[c] for c in train), dtype=np.uint16, count=len(train))
    val_ids = np.fromiter((stoi[c] for c in val), dtype=np.uint16, count=len(val))
    _check_split("train", train_ids, source)
    _check_split("val", val_ids, source)
    os.makedirs(out_dir, exist_ok=True)
    char_tokenizer(chars).save_pretrained(out_dir)  # for the Hub and AutoTokenizer; the trainer reads meta.json
    return _finish(out_dir, train_ids, val_ids, tokenizer="char", vocab_size=len(chars), source=source,
                   extra={"itos": dict(enumerate(chars))})


def prepare_shakespeare(out_dir, text=None, source=None):
    """nanoGPT's data/shakespeare/prepare.py: GPT-2 BPE, 301,966 train and 36,059 val tokens."""
    if text is None:
        text, source = shakespeare_text(out_dir)
    enc = gpt2_encoding()
    train, val = _split_90_10(text)
    train_ids, val_ids = enc.encode_ordinary(train), enc.encode_ordinary(val)
    _check_split("train", train_ids, source)
    _check_split("val", val_ids, source)
    os.makedirs(out_dir, exist_ok=True)
    return _finish(out_dir, train_ids, val_ids, tokenizer="gpt2", vocab_size=enc.n_vocab, source=source)


def _finish(out_dir, train_ids, val_ids, tokenizer, vocab_size, source, extra=None):
    write_bin(os.path.join(out_dir, "train.bin"), train_ids)
    write_bin(os.path.join(out_dir, "val.bin"), val_ids)
    meta = dict(tokenizer=tokenizer, vocab_size=vocab_size, dtype="uint16", train_tokens=len(train_ids),
                val_tokens=len(val_ids), source=source, **(extra or {}))
    if tokenizer == "gpt2":
        meta["eot_token"] = GPT2_EOT
    meta["fingerprint"] = _fingerprints(out_dir)
    write_json(os.path.join(out_dir, "meta.json"), meta)  # last: its presence means the bins are complete
    print(f"{out_dir}: train has {len(train_ids):,} tokens, val has {len(val_ids):,} tokens (vocab {vocab_size})")
    return meta


def _fingerprints(out_dir):
    """The content fingerprint of each bin as written (corpus.content_fingerprint): a later edit is noticed."""
    return {split: content_fingerprint(os.path.join(out_dir, f"{split}.bin")) for split in ("train", "val")}


def _tokenize_examples(batch, text_column):
    ids = tokenize_batch(batch[text_column])
    return {"ids": ids, "len": [len(x) for x in ids]}


def prepare_documents(out_dir, dataset=None, files=None, text_column="text", num_proc=1, test_size=0.0005,
                      seed=2357, sample_by="paragraph", total_batches=1024):
    """nanoGPT's data/openwebtext/prepare.py on any dataset or local files."""
    ds = load_documents(dataset, files, text_column, num_proc, sample_by)
    source = dataset or [os.path.abspath(f) for f in files]
    train = ds["train"]
    if len(train) < 2:
        raise UserError(f"{source}: {len(train)} document(s); the train/val split needs at least 2")
    split = train.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    split["val"] = split.pop("test")  # rename the test split to val
    tokenized = split.map(
        _tokenize_examples, fn_kwargs={"text_column": text_column}, remove_columns=split["train"].column_names,
        desc="tokenizing the splits", num_proc=num_proc if num_proc and num_proc > 1 else None, batched=True,
    )
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for name, dset in tokenized.items():
        counts[name] = _write_memmap(os.path.join(out_dir, f"{name}.bin"), dset, total_batches)
        if counts[name] < 2:
            raise UserError(f"{source}: the {name} split has {counts[name]} tokens; give a longer corpus")
    meta = dict(tokenizer="gpt2", vocab_size=gpt2_encoding().n_vocab, dtype="uint16", train_tokens=counts["train"],
                val_tokens=counts["val"], source=source, eot_token=GPT2_EOT, test_size=test_size, seed=seed,
                fingerprint=_fingerprints(out_dir))
    write_json(os.path.join(out_dir, "meta.json"), meta)
    print(f"{out_dir}: train has {counts['train']:,} tokens, val has {counts['val']:,} tokens")
    return meta


def _write_memmap(path, dset, total_batches):
    """Concatenates all ids into one uint16 memmap, one contiguous shard at a time (bounded memory).

    Shards are read as Arrow tables and their list column flattened in one call: datasets' numpy formatting
    goes row by row, which made it most of the recipe's time (docs/performance.md)."""
    import pyarrow.compute as pc

    arr_len = int(pc.sum(dset.with_format("arrow")[:]["len"]).as_py() or 0)
    with atomic_path(path) as tmp:
        arr = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(max(arr_len, 1),))
        idx = 0
        n_shards = max(1, min(total_batches, len(dset)))
        for batch_idx in tqdm(range(n_shards), desc=f"writing {os.path.basename(path)}"):
            table = dset.shard(num_shards=n_shards, index=batch_idx, contiguous=True).with_format("arrow")[:]
            arr_batch = pc.list_flatten(table["ids"]).to_numpy().astype(np.uint16)
            arr[idx : idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
        del arr
        if arr_len == 0:
            os.truncate(tmp, 0)
    return arr_len


# --------------------------------------------------------------------------------------------- CLI
def build_parser(default_recipe=None, default_dataset=None):
    p = argparse.ArgumentParser(prog="nanogpt-prepare", description="Prepare train.bin/val.bin/meta.json (nanoGPT layout).")
    p.add_argument("recipe", nargs="?" if default_recipe else None, default=default_recipe,
                   choices=["shakespeare_char", "shakespeare", "documents"],
                   help="shakespeare_char | shakespeare | documents (any dataset or local files, OpenWebText recipe)")
    p.add_argument("--out_dir", default=None, help="output folder (default: data/<recipe> or data/<dataset>)")
    p.add_argument("--input", default=None, help="shakespeare recipes: a text file instead of Tiny Shakespeare")
    p.add_argument("--dataset", default=default_dataset, help="documents: a datasets name (e.g. openwebtext)")
    p.add_argument("--files", nargs="+", default=None, help="documents: local .txt/.jsonl/.parquet files instead")
    p.add_argument("--text_column", default="text")
    p.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--test_size", type=float, default=0.0005)
    p.add_argument("--seed", type=int, default=2357)
    p.add_argument("--sample_by", default="paragraph", choices=["line", "paragraph", "document"],
                   help=".txt files: what one document is")
    return p


@cli_main
def main(argv=None, default_recipe=None, default_dataset=None, default_out_dir=None):
    args = build_parser(default_recipe, default_dataset).parse_args(argv)
    out_dir = args.out_dir or default_out_dir or os.path.join("data", args.recipe if args.recipe != "documents"
                                                              else (args.dataset or "documents").replace("/", "_"))
    if args.recipe in ("shakespeare_char", "shakespeare"):
        text, source = (read_text(args.input), os.path.abspath(args.input)) if args.input else (None, None)
        fn = prepare_shakespeare_char if args.recipe == "shakespeare_char" else prepare_shakespeare
        return fn(out_dir, text=text, source=source)
    return prepare_documents(out_dir, dataset=None if args.files else args.dataset, files=args.files,
                             text_column=args.text_column, num_proc=args.num_proc, test_size=args.test_size,
                             seed=args.seed, sample_by=args.sample_by)


if __name__ == "__main__":
    main()
