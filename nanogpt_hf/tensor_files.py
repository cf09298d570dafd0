"""A safetensors file's tensors read where and as far as asked: a tensor left in the file (TensorInFile) reads the
rows asked for alone, with plain reads at their offsets, so a rank of a sharded resume reads and holds its own part
of each optimizer tensor and nothing of the rest (checkpoint.load_tree(lazy=True), optim._like)."""

import json

import torch

from .errors import UserError

__all__ = ["SAFETENSORS_DTYPES", "TensorInFile", "tensors_in_file", "read_whole"]

# safetensors' names of the dtypes a training state holds
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class TensorInFile:
    """A tensor of a safetensors file, not read yet. rows(start, stop) reads those rows (along dim 0) alone, with
    plain reads into a new tensor: nothing of the file stays mapped into the process, so a rank holds what it read
    and nothing more (safetensors' own slices map the file, and the pages read stay resident while it is open)."""

    def __init__(self, path, dtype, shape, begin):
        self.path, self.dtype, self.shape, self.begin = path, dtype, torch.Size(shape), begin

    def rows(self, start=0, stop=None):
        if not self.shape:  # a 0-dim tensor (AdamW's step): its one value
            return self._read(0, self.dtype.itemsize).view(self.dtype).reshape(())
        stop = self.shape[0] if stop is None else stop
        row = self.shape[1:].numel() * self.dtype.itemsize
        return self._read(start * row, (stop - start) * row).view(self.dtype).reshape(stop - start, *self.shape[1:])

    def _read(self, offset, size):
        out = torch.empty(size, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.begin + offset)
            if f.readinto(out.numpy()) != size:
                raise UserError(f"{self.path}: the file ends inside a tensor; resume from another checkpoint")
        return out


def tensors_in_file(path):
    """{name: TensorInFile} from a safetensors file's header (8 bytes of length, then JSON)."""
    dtypes = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {name: TensorInFile(path, dtypes[entry["dtype"]], entry["shape"], 8 + length + entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"}


def read_whole(value):
    """A tensor, read from its file where load_tree(lazy=True) left it there."""
    return value.rows() if isinstance(value, TensorInFile) else value
