"""Reading corpora and prepared datasets: the readers shared by prepare.py, the trainer, data.py and nanogpt-eval.

A prepared folder holds train.bin and val.bin (uint16 token ids) and meta.json (tokenizer, vocabulary, counts),
written last, so its presence means the bins are complete.
"""

import functools
import json
import logging
import os

import numpy as np

from .errors import UserError, first_line
from .tokenization import GPT2_EOT, gpt2_encoding

__all__ = ["dataset_dir", "read_meta", "check_prepared", "content_fingerprint", "data_fingerprint", "read_text", "load_documents",
           "tokenize_batch", "BUILDERS"]

BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def dataset_dir(name):
    """nanoGPT's layout: data/<name> under the working directory (where data/<name>/prepare.py writes)."""
    return os.path.join("data", name)


def read_meta(data_dir):
    """meta.json of a prepared folder, with a clear error where it is missing or broken."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise UserError(f"dataset folder {data_dir} does not exist: run its prepare.py first (python {data_dir}/prepare.py)")
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: the dataset is not prepared (or preparation was interrupted); run prepare.py")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e}); run prepare.py again") from e


def check_prepared(data_dir, allow_change=False, warn=None):
    """meta.json, after checking the bins against it: a truncated, replaced, edited or odd-sized bin is one clear
    error (an edit that keeps the size is caught by the content fingerprint prepare.py recorded in meta.json;
    allow_change turns that one into a warning)."""
    meta = read_meta(data_dir)
    recorded = meta.get("fingerprint") or {}
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.exists(path):
            raise UserError(f"{path} is missing: run the dataset's prepare.py first")
        size = os.path.getsize(path)
        expected = meta.get(f"{split}_tokens")
        if size % 2:
            raise UserError(f"{path} has an odd number of bytes ({size}): not uint16 token ids; run prepare.py again")
        if isinstance(expected, int) and size // 2 != expected:
            raise UserError(f"{path} holds {size // 2:,} tokens but meta.json says {expected:,}: the bin is truncated or "
                            f"from another preparation; run prepare.py again")
        vocab = meta.get("vocab_size")
        head = np.memmap(path, dtype=np.uint16, mode="r")[: 1 << 20]  # the first million tokens: a cheap look
        if isinstance(vocab, int) and head.size and int(head.max()) >= vocab:
            raise UserError(f"{path} holds token id {int(head.max())}, outside meta.json's vocabulary of {vocab}: the bin "
                            f"is not what prepare.py wrote; run it again")
        if split in recorded and recorded[split] != content_fingerprint(path):
            message = (f"{path} is not the file prepare.py wrote (its content fingerprint differs from meta.json's: "
                       f"edited or replaced since)")
            if not allow_change:
                raise UserError(f"{message}; run prepare.py again, or pass --allow_data_change=true")
            if warn:
                warn(f"warning: {message}; continuing (allow_data_change=true)")
    return meta


def content_fingerprint(path):
    """sha256 of the file's size and of 64 blocks of 64 KB spread evenly over it (the first and the last included): a
    few MB read whatever the size, so it is checked at every start. Any edit of the tokens at large (a
    re-tokenization, a shifted vocabulary) changes it; a single changed token between samples does not. Read once per
    version of the file in a process (the trainer's start asks three times: meta.json's check, the checkpoint's, the
    new checkpoints' record)."""
    st = os.stat(path)
    return _sampled_sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=16)
def _sampled_sha256(path, size, mtime_ns, inode, samples=64, block=1 << 16):
    import hashlib

    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(samples):
            f.seek((max(0, size - block) * i) // (samples - 1))
            h.update(f.read(block))
    return h.hexdigest()


def data_fingerprint(data_dir):
    """What a checkpoint records of its data (sizes, sampled content, meta.json), to notice a resume on changed
    data. Checkpoints written before the content keys compare on the keys they have."""
    import hashlib

    with open(os.path.join(data_dir, "meta.json"), "rb") as f:
        found = {"meta_sha256": hashlib.sha256(f.read()).hexdigest()}
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        found[f"{split}_bytes"] = os.path.getsize(path)
        found[f"{split}_content"] = content_fingerprint(path)
    return found


def read_text(path):
    """A whole UTF-8 text file; one clear error for a missing, empty or non-UTF-8 file."""
    if not os.path.isfile(path):
        raise UserError(f"input file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise UserError(f"input file {path} is empty: give a text corpus")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                        f"convert it, e.g. iconv -f latin1 -t utf-8") from e


def load_documents(dataset=None, files=None, text_column="text", num_proc=None, sample_by="paragraph", streaming=False):
    """A `datasets` dataset (all splits) of documents from a hub name or local files, text column checked."""
    import datasets

    if bool(dataset) == bool(files):
        raise UserError("give either a dataset name (--dataset) or local files (--files), not both or neither")
    # datasets' JSON reader logs a malformed line as an error before raising it: the UserError below says the same
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    try:
        if files:
            builder, kwargs = _builder_for(files, sample_by)
            ds = datasets.load_dataset(builder, data_files={"train": list(files)}, streaming=streaming, **kwargs)
        else:
            ds = datasets.load_dataset(dataset, streaming=streaming, **({} if streaming else {"num_proc": num_proc}))
    except UserError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise UserError(f"cannot load {dataset or files}: {str(e).splitlines()[0]}") from e
    except Exception as e:  # datasets wraps decode errors of its builders in its own exception types
        if isinstance(e.__cause__ or e.__context__, UnicodeDecodeError) or "codec can't decode" in str(e):
            raise UserError(f"{dataset or files}: not UTF-8 text; convert it, e.g. iconv -f latin1 -t utf-8") from e
        cause = e.__cause__ or e.__context__
        if files and type(cause).__module__.startswith("pyarrow"):  # a malformed record (a broken JSON line)
            raise UserError(f"{', '.join(files)}: a record cannot be read ({type(cause).__name__}: "
                            f"{first_line(cause)}); fix or remove it") from e
        raise
    split = next(iter(ds.values()))
    columns = split.column_names or []
    if columns and text_column not in columns:
        raise UserError(f"{dataset or files}: no column {text_column!r} (columns: {', '.join(columns)}); "
                        f"pass --text_column with one of them")
    return ds


def _builder_for(files, sample_by):
    kinds = set()
    for path in files:
        if not os.path.isfile(path):
            raise UserError(f"input file {path} does not exist")
        if os.path.getsize(path) == 0:
            raise UserError(f"input file {path} is empty: give a text corpus")
        ext = os.path.splitext(path)[1].lower()
        if ext not in BUILDERS:
            raise UserError(f"{path}: unknown file type {ext!r}; use .txt, .jsonl, .json, .parquet or .csv")
        kinds.add(BUILDERS[ext])
        if BUILDERS[ext] in ("text", "json"):
            _check_utf8(path)
    if len(kinds) > 1:
        raise UserError(f"mixed file types ({', '.join(sorted(kinds))}): prepare one kind at a time")
    builder = kinds.pop()
    return builder, ({"sample_by": sample_by} if builder == "text" else {})


def _check_utf8(path, chunk=1 << 24):
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 (byte {offset + e.start}); convert it, e.g. iconv -f latin1 -t utf-8") from e
            offset += len(block)


def tokenize_batch(texts):
    """encode_ordinary (special tokens are plain text) + EOT after each document, like nanoGPT's openwebtext."""
    enc = gpt2_encoding()
    # a plain loop: encode_ordinary_batch's thread pool costs more than it saves here (docs/performance.md)
    return [enc.encode_ordinary(text) + [GPT2_EOT] for text in texts]
