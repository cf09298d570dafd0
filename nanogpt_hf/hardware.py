"""Peak FLOP/s for MFU (a table of dense bf16/fp16 tensor-core peaks for GPUs, a measured matmul rate on CPU),
the CPU allocator setting the trainer and the benchmark use, and the --device flag of the scripts."""

import ctypes
import ctypes.util
import time

import torch

from .errors import UserError

__all__ = ["GPU_PEAK_FLOPS", "peak_flops", "measured_matmul_flops", "keep_freed_memory_mapped", "resolve_device"]

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, FLOP/s.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "A100": 312e12,  # nanoGPT's figure
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def measured_matmul_flops(n=2048, repeats=3, dtype=torch.float32):
    """Best observed rate of an n^3 matmul on the CPU (the practical peak on a shared machine)."""
    g = torch.Generator().manual_seed(0)  # private: measuring must not move the training RNG streams
    a, b = torch.randn(n, n, dtype=dtype, generator=g), torch.randn(n, n, dtype=dtype, generator=g)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device, override=None, dtype=torch.float32):
    """FLOP/s that MFU is measured against: override, else the GPU's table entry (bf16/fp16), else the rate of
    a dtype matmul measured on the CPU (bf16 on a CPU with AMX is several times its fp32 rate)."""
    if override:
        return float(override)
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
        return 312e12  # unknown GPU: nanoGPT's A100 reference
    return measured_matmul_flops(dtype=dtype)


def keep_freed_memory_mapped():
    """glibc malloc: serve big blocks from the heap and never give freed heap back to the kernel. True if set.

    A CPU training step allocates and frees the same large activations and gradients every step. By default glibc
    maps each block above its mmap threshold afresh and unmaps it on free, and trims the heap top, so the memory
    is page-faulted in again every step: 165,000 minor faults and 0.3 s of kernel time per step at the 6-layer/384
    BPE shape, 500 at the quickstart shape. With both thresholds raised the faults drop to ~0 (nanogpt-bench:
    baby shape step 2013 -> 1564 ms, quickstart 30.4 -> 29.5 ms). The cost: the process keeps its peak heap until
    it exits, which a training process reaches again every step anyway. Does nothing where glibc is not the
    allocator.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    # 1 GiB: above the biggest per-step blocks (the 77 MB embedding gradient of a 50304 x 384 model); setting it
    # also turns off glibc's dynamic threshold. Older glibc refuses values above 32 MiB (returns 0): take that.
    mapped = mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mapped)


def resolve_device(name):
    """A --device flag (auto | cpu | cuda | cuda:N) as a torch.device, or one line saying why not."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name}: {e}") from e
