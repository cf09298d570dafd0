"""Run by tests/test_sharded.py under `torchrun --nproc_per_node 2` (gloo, CPU): PyTorch's FSDP2 on stacks of
matrices, then (1) Muon's step: the collectives it issues, counted with torch's CommDebugMode, and its weights
against the same steps in one process; (2) a checkpoint's gathering of AdamW's state: the host memory each rank
keeps, and holds at most, from glibc's allocation counts sampled while it runs, gathered into memory (a stop
signal's save) and streamed to a file in the folder given as argv[1] (every other save); (3) a resume from that
file: the bytes each rank reads, the storage its restored state holds and its resident memory at most. Writes one
JSON file per rank (rankN.json in that folder)."""

import ctypes
import json
import os
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode

from nanogpt_hf.checkpoint import load_tree, stream_tree
from nanogpt_hf.optim import Muon, load_optimizer_state, optimizer_state, whole_tensor

WIDTH, DEPTH, STEPS = 256, 4, 3  # Muon's stack
BIG = 2048  # the checkpoint's: 4 x 16 MB matrices, 128 MB of AdamW state, more than the process's free heap


class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (glibc >= 2.33): every field a size_t
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


_mallinfo2 = ctypes.CDLL(None).mallinfo2
_mallinfo2.restype = MallInfo2


def allocated():
    """Bytes the process has allocated from glibc and not freed (heap in use + mmapped blocks): unlike RSS, not
    hidden by freed heap being reused."""
    info = _mallinfo2()
    return info.uordblks + info.hblkhd


def resident():
    """The process's resident memory (VmRSS): mapped file pages it has touched count, as safetensors maps its files."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(fn, amount=allocated):
    """(fn's result, bytes it left held, the most it held at once while running), from amount() (by default
    allocated()) sampled every 0.5 ms."""
    start, peak, done = amount(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], amount() - start)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    left = amount() - start
    return result, left, max(peak[0], left)


def stack(seed, width=WIDTH):
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(DEPTH)])


def sharded(seed, width=WIDTH):
    model = stack(seed, width)
    for layer in model:
        fully_shard(layer)
    return fully_shard(model)


def batch(g, width=WIDTH):
    return torch.randn(8, width, generator=g)  # the same batches on every rank: FSDP's mean gradient is 1 process's


def train(model, optimizer, steps, g, width=WIDTH):
    for _ in range(steps):
        model(batch(g, width)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # (1) Muon: STEPS steps sharded, the last one's collectives counted; the same STEPS steps in one process
    model, g = sharded(0), torch.Generator().manual_seed(1)
    optimizer = Muon(model.parameters(), lr=0.02, ns_dtype=torch.float32)
    train(model, optimizer, STEPS - 1, g)
    model(batch(g)).square().mean().backward()
    with CommDebugMode() as comms:  # the step alone: the backward's reduce-scatters are FSDP's, not Muon's
        optimizer.step()
    single = stack(0)
    train(single, Muon(single.parameters(), lr=0.02, ns_dtype=torch.float32), STEPS, torch.Generator().manual_seed(1))
    difference = max((a.full_tensor() - b).abs().max().item() for a, b in zip(model.parameters(), single.parameters()))
    # (2) a checkpoint's gathering of AdamW's state: only rank 0, which writes, keeps it
    big = sharded(2, BIG)
    adamw = torch.optim.AdamW(big.parameters())
    train(big, adamw, 1, torch.Generator().manual_seed(3), BIG)
    kept, left, peak = measured(lambda: optimizer_state(big, adamw, keep=rank == 0))
    # what a checkpoint does: streamed to the file, one gathered tensor at a time (rank 0 writes)
    stem = os.path.join(sys.argv[1], "optimizer")
    _, _, stream_peak = measured(lambda: stream_tree(stem, optimizer_state(big, adamw, whole=False),
                                                     lambda t: whole_tensor(t, keep=rank == 0), rank == 0))
    same_file = None
    if rank == 0:  # the streamed file reads back as the gathered state, bit for bit
        streamed = load_tree(stem)["state"]
        same_file = streamed.keys() == kept["state"].keys() and all(
            torch.equal(streamed[n][k], v) for n, values in kept["state"].items() for k, v in values.items())
    # (3) a resume from that file: each rank reads its own rows of every tensor; its allocations and its resident
    # memory (RSS: where a file is mapped, the pages read count too) sampled while it loads, then reads every value
    dist.barrier()  # rank 0 has closed the file
    fresh = sharded(4, BIG)
    fresh_adamw = torch.optim.AdamW(fresh.parameters())

    def resume():
        read = load_optimizer_state(fresh, fresh_adamw, load_tree(stem, lazy=True), stem)
        sum(v.to_local().sum() for s in fresh_adamw.state.values() for v in s.values() if v.ndim)  # every page touched
        return read

    (read, _, rss_peak), resume_kept, resume_peak = measured(lambda: measured(resume, resident))  # RSS inside glibc's count
    local = [v.to_local() if v.ndim else v for s in fresh_adamw.state.values() for v in s.values()]
    same = all(torch.equal(whole_tensor(fresh_adamw.state[q][k], True), whole_tensor(adamw.state[p][k], True))
               for p, q in zip(big.parameters(), fresh.parameters()) for k in ("exp_avg", "exp_avg_sq", "step"))
    resumed = {"bytes_read": read, "host_bytes_kept": resume_kept, "host_bytes_peak": resume_peak, "rss_peak": rss_peak,
               "equals_saved": same,
               "state_storage_bytes": sum(v.untyped_storage().nbytes() for v in local)}
    result = {"rank": rank, "muon_collectives": comms.get_total_counts(), "matrices": DEPTH,
              "resume": resumed, "file_bytes": os.path.getsize(stem + ".safetensors"),
              "max_difference_vs_one_process": difference, "kept": kept is not None,
              "host_bytes_kept": left, "host_bytes_peak": peak, "stream_peak": stream_peak,
              "streamed_file_equals_gathered_state": same_file,
              "optimizer_bytes": sum(2 * p.numel() * 4 for p in big.parameters()),  # exp_avg(_sq), fp32
              "largest_tensor_bytes": BIG * BIG * 4}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:  # a file each: the ranks' stdout interleaves
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
