"""Training batches: nanoGPT's random memmap windows, or a packed token stream straight from a dataset.

Both sources yield (x, y) int64 tensors of shape (batch_size, block_size), y being x shifted by one, and both
have `state_dict()` / `load_state_dict()`: their position is part of the training state, so after a resume
the next batch is exactly the one that would have come.
"""

import copy
import os

import numpy as np
import torch

from .corpus import load_documents, read_meta, tokenize_batch
from .errors import UserError, first_line

__all__ = ["MemmapBatches", "StreamingBatches", "check_bin", "train_batches", "eval_batches"]


def check_bin(data_dir, split, block_size):
    """Path of a prepared split, with clear errors for a missing, empty or too short bin."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: run the dataset's prepare.py first")
    n_tokens = os.path.getsize(path) // 2  # uint16
    if n_tokens == 0:
        raise UserError(f"{path} is empty: run the dataset's prepare.py again on a non-empty corpus")
    if n_tokens <= block_size:
        raise UserError(f"{path} has {n_tokens} tokens, fewer than one block of {block_size} + 1; "
                        f"use a smaller block_size or a longer corpus")
    return path


class MemmapBatches:
    """nanoGPT's get_batch: batch_size random windows of block_size + 1 tokens from a uint16 .bin file.

    The window positions come from a private torch.Generator with the SAME seed on every rank: each call draws
    the windows of all world_size ranks and keeps this rank's share. So the global sequence of micro-batches is
    the same whatever the number of processes (a 2-process run sees exactly the tokens of a 1-process run with
    twice the accumulation), and it is reproducible and resumable independently of dropout or sampling."""

    def __init__(self, data_dir, split, block_size, batch_size, seed, rank=0, world_size=1, pin=False):
        read_meta(data_dir)  # a folder without meta.json was never completely prepared
        self.path = check_bin(data_dir, split, block_size)
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.pin = pin  # page-locked batches: a GPU copies them with non_blocking=True while it computes
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        # recreate np.memmap every batch to avoid a memory leak, as per
        # https://stackoverflow.com/questions/45132940/numpy-memmap-memory-usage-want-to-iterate-once/61472122#61472122
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - self.block_size, (self.world_size * self.batch_size,), generator=self.generator)
        ix = ix[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = torch.stack([torch.from_numpy(data[i : i + self.block_size + 1].astype(np.int64)) for i in ix.tolist()])
        x, y = windows[:, :-1], windows[:, 1:]  # (B, T) inputs, (B, T) targets
        return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


class StreamingBatches:
    """Documents streamed with `datasets` (no pre-tokenized file), tokenized with tiktoken in batches (EOT after
    each document), packed into rows of block_size + 1 tokens, split across processes.

    Sharding: with a number of shards divisible by the world size each rank reads its own shards; otherwise
    `split_dataset_by_node` makes every rank read every example and keep every world_size-th one. The split
    happens before tokenization, so a rank tokenizes only its own examples either way. Rows are packed per rank;
    the tail of a document stream shorter than a row waits in the buffer for the next epoch's tokens.

    Position = the dataset's own state_dict (example-exact) + the tokens waiting in the packing buffer."""

    def __init__(self, block_size, batch_size, dataset=None, files=None, split="train", text_column="text",
                 rank=0, world_size=1, sample_by="paragraph", log=print):
        from datasets.distributed import split_dataset_by_node

        self.source = dataset or ", ".join(files)
        splits = load_documents(dataset, files, text_column, streaming=True, sample_by=sample_by)
        if split not in splits:
            raise UserError(f"{dataset or files}: no split {split!r} (splits: {', '.join(splits)})")
        ds = splits[split]
        if world_size > 1:
            if ds.num_shards % world_size:
                log(f"streaming: {ds.num_shards} shard(s) do not divide world size {world_size}: every rank reads all "
                    f"examples and keeps every {world_size}-th (each tokenizes only its own)")
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        self.ds = ds.map(_tokenize_column, batched=True, fn_kwargs={"text_column": text_column},
                         remove_columns=list(ds.column_names or [text_column]))
        self.row = block_size + 1
        self.batch_size = batch_size
        self.epoch = 0
        self.buffer = []
        self._dataset_state = None  # the dataset's state after the last example taken into the buffer
        self._iterator = None

    def _next_row(self):
        while len(self.buffer) < self.row:
            if self._iterator is None:
                self.ds.set_epoch(self.epoch)
                self._iterator = iter(self.ds)
            try:
                example = next(self._iterator)
            except StopIteration:
                if self._dataset_state is None and not self.buffer:
                    raise UserError("the streamed dataset yielded no text: check the files or dataset name")
                self.epoch += 1
                self._iterator = None
                continue
            except Exception as e:  # a malformed record (a broken JSON line): pyarrow's or datasets' error, raised here
                if not (isinstance(e, (ValueError, UnicodeDecodeError)) or
                        type(e).__module__.startswith(("pyarrow", "datasets"))):
                    raise
                raise UserError(f"{self.source}: a record cannot be read ({type(e).__name__}: {first_line(e)}); fix "
                                f"or remove it") from e
            self.buffer.extend(example["ids"])
            self._dataset_state = copy.deepcopy(self.ds.state_dict())
        row, self.buffer = self.buffer[: self.row], self.buffer[self.row :]
        return row

    def next_batch(self):
        rows = torch.tensor([self._next_row() for _ in range(self.batch_size)], dtype=torch.long)  # (B, T + 1)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"epoch": self.epoch, "buffer": list(self.buffer), "dataset": copy.deepcopy(self._dataset_state)}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]
        self.buffer = list(state["buffer"])
        self._dataset_state = copy.deepcopy(state["dataset"])
        self._iterator = None
        if self._dataset_state is not None:
            self.ds.load_state_dict(self._dataset_state)


def _tokenize_column(batch, text_column):
    texts = batch[text_column]
    wrong = [t for t in texts if not isinstance(t, str)]
    if wrong:  # a ValueError: the reader turns it into one line naming the source
        raise ValueError(f"its {text_column!r} is {type(wrong[0]).__name__} {repr(wrong[0])[:40]}, not text")
    return {"ids": tokenize_batch(texts)}


# ------------------------------------------------------------------------------------------ the trainer's sources
def _streaming(cfg, files, split, rank, world, log):
    return StreamingBatches(cfg.block_size, cfg.batch_size, dataset=cfg.stream_dataset or None, files=files or None,
                            split=split, text_column=cfg.stream_text_column, rank=rank, world_size=world, log=log)


def train_batches(cfg, data_dir, rank, world, pin, log):
    """The training batches of a run (its position is part of every checkpoint)."""
    if cfg.data_source == "streaming":
        return _streaming(cfg, cfg.stream_files, cfg.stream_split, rank, world, log)
    return MemmapBatches(data_dir, "train", cfg.block_size, cfg.batch_size, cfg.seed, rank, world, pin)


def eval_batches(cfg, data_dir, split, iter_num, rank, world, pin):
    """A fresh source per evaluation: deterministic (no training state to save), different at each eval."""
    if cfg.data_source == "streaming":
        files = cfg.stream_val_files if split == "val" else cfg.stream_files
        stream_split = cfg.stream_split if split == "train" or cfg.stream_val_files else cfg.stream_val_split
        return _streaming(cfg, files, "train" if files else stream_split, rank, world, lambda m: None)
    seed = cfg.seed * 1_000_003 + iter_num * 2 + (split == "val")
    return MemmapBatches(data_dir, split, cfg.block_size, cfg.batch_size, seed, rank, world, pin)
