"""Peak FLOP/s for MFU: a table of dense bf16/fp16 tensor-core peaks for GPUs, a measured matmul rate on CPU."""

import time

import torch

__all__ = ["GPU_PEAK_FLOPS", "peak_flops", "measured_matmul_flops"]

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


def peak_flops(device, override=None):
    """FLOP/s that MFU is measured against: override, else the GPU's table entry, else measured on the CPU."""
    if override:
        return float(override)
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
        return 312e12  # unknown GPU: nanoGPT's A100 reference
    return measured_matmul_flops()
