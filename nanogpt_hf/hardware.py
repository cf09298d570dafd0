"""Peak FLOP/s for MFU (a table of dense bf16/fp16 tensor-core peaks for GPUs, a measured matmul rate on CPU),
whether a device computes bf16 natively, the CPU allocator setting the trainer and the benchmark use, and the
--device flag of the scripts."""

import ctypes
import ctypes.util
import functools
import os
import re
import time

import torch

from .errors import UserError

__all__ = ["GPU_PEAK_FLOPS", "gpu_peak_flops", "peak_flops", "measured_matmul_flops",
           "checked_peak", "native_bf16",
           "keep_freed_memory_mapped", "resolve_device"]

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, FLOP/s, by a word of the name torch
# reports. The first match wins, so each variant comes before its family ("NVIDIA H100 80GB HBM3" is the SXM card,
# "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are not). A GPU not listed has no known peak: its MFU is reported as
# unknown rather than guessed (the A100's figure would overstate an L4's MFU ~2.6x).
GPU_PEAK_FLOPS = (
    ("GH200", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H800", 989e12),
    ("GB200", 2500e12), ("B200", 2250e12), ("B100", 1750e12),
    ("A100", 312e12), ("A800", 312e12),  # nanoGPT's reference figure
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
)
# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: bf16 matmuls are then emulated even on a CPU with it
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def gpu_peak_flops(name):
    """The table's peak for a GPU name as torch reports it, or None for a GPU the table does not know."""
    for key, flops in GPU_PEAK_FLOPS:
        if re.search(rf"(^|[\s-]){re.escape(key)}([\s-]|$)", name):
            return flops
    return None


def measured_matmul_flops(dtype=torch.float32, max_n=2048, budget_s=0.3, repeats=3):
    """Best observed rate of a square matmul on the CPU (the practical peak on a shared machine). The size doubles
    from 256 up to max_n only while the next size fits the time budget, so a dtype the CPU emulates (bf16 without
    AVX512-BF16/AMX: ~50x slower than fp32) costs a fraction of a second, not minutes."""
    g = torch.Generator().manual_seed(0)  # private: measuring must not move the training RNG streams
    n, peak = 256, 0.0
    while True:
        a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        # the best rate over every size: a larger size is not always faster (on an AMD EPYC 1024^2 ran at a third of
        # 512^2's rate, out of cache), and the last one measured made MFU read 300%
        peak = max(peak, 2 * n**3 / best)
        if n >= max_n or best * 8 * (repeats + 1) > budget_s:  # the next size costs 8x per matmul
            return peak
        n *= 2


def checked_peak(peak, rate, device, dtype, warn):
    """The peak to measure MFU against once a step has run at `rate` FLOP/s: a step faster than the peak means the
    peak is wrong (a CPU's was measured while the machine was busy), so a CPU's is measured again once; if the step
    still beats it, None (MFU n/a from here on) and one warning line saying why. MFU is never above 100%."""
    if rate <= peak:
        return peak
    if torch.device(device).type == "cpu":
        peak = max(peak, measured_matmul_flops(dtype=dtype))
        if rate <= peak:
            return peak
    warn(f"warning: MFU n/a from here on: a step ran at {rate / 1e9:,.1f} GFLOP/s, faster than the peak it is measured "
         f"against ({peak / 1e9:,.1f} GFLOP/s; on a CPU, measured at start-up while the machine was busy?)")
    return None


def peak_flops(device, override=None, dtype=torch.float32):
    """FLOP/s that MFU is measured against: override, else the GPU's table entry (bf16/fp16; None for a GPU the
    table does not know), else the rate of a dtype matmul measured on the CPU."""
    if override:
        return float(override)
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return measured_matmul_flops(dtype=dtype)


@functools.lru_cache(maxsize=None)
def _cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:  # not Linux: no flags to read
        return set()


def native_bf16(device):
    """Whether the device computes bf16 matmuls natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX
    that oneDNN is allowed to use. Decided from the hardware, not timed, so every process of a run agrees.
    Elsewhere bf16 is emulated through fp32 and several times slower (measured 23x for Muon's Newton-Schulz with
    oneDNN limited to AVX2; docs/speedrun.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    return isa not in _NO_BF16_ISAS and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


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
