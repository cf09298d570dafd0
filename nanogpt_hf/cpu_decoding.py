"""Decoding's matrix-vector products on a CPU, at the speed the memory streams the weights.

Decoding multiplies a few rows (one per sequence) by every weight matrix: a matrix-vector product bound by reading
the weight from memory once per token. MKL runs F.linear's GEMV on one core: 15-21 GB/s on the 2-core AMD EPYC of
docs/performance.md, whose memory streams at 45-75 GB/s. The same product as a batched GEMM over row blocks of the
weight, two blocks per thread, reads at the memory's speed (55-72 GB/s for a 50k x 384 head there): torch.bmm hands
same-layout batch items to MKL's strided batched GEMM, which runs the items in parallel, each a GEMV over contiguous
rows. No copy of the weight: the blocks are a view of it.

Under torch.compile the product is an opaque custom op, so that inductor keeps the layout MKL streams (inductor's
own lowering of the same bmm copies the vector into another layout and reads at 11 GB/s).
"""

import torch
from torch.nn import functional as F

__all__ = ["decoding_linear", "is_decoding_product"]

MAX_ROWS = 4  # at 8 rows and more MKL's own GEMM is as fast (measured: 50k x 384 and the blocks' shapes)
# Below 128k weights (512 KB) the ~10 us of the extra calls cost more than the read saves (a 384 x 128 matrix: 5 us
# by F.linear from the cache, 13 us in blocks); from 384 x 384 up the blocks read faster (24 vs 45 us from memory)
MIN_WEIGHTS = 1 << 17
# Two blocks a thread read 3-8% faster than one (the head: 70-72 against 66-70 GB/s; the blocks' matrices 66-68
# against 62-64, the AMD EPYC of docs/performance.md, natively and held to AVX2 alike); four a thread, no faster
BLOCKS_PER_THREAD = 2
_MKL = torch.backends.mkl.is_available()  # without MKL, torch.bmm multiplies the blocks one after the other


def is_decoding_product(x, weight):
    """Whether F.linear(x, weight) is a decoding step's product that decoding_linear reads faster: fp32 on a CPU,
    outside autograd, a few rows, a weight of 512 KB or more, MKL. Every test is one torch.compile can trace."""
    return (weight.numel() >= MIN_WEIGHTS and x.numel() <= MAX_ROWS * x.size(-1) and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled() and _MKL)


def decoding_linear(x, weight, bias):
    """F.linear(x, weight, bias) for the products is_decoding_product accepts, the weight's row blocks in parallel."""
    if torch.compiler.is_compiling():
        return torch.ops.nanogpt_hf.decoding_linear(x, weight, bias)
    return _row_blocks_linear(x, weight, bias)


def _row_blocks_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), the weight split into blocks of rows, two a thread, and the blocks multiplied in
    parallel. The same sums as F.linear's in another order: the same numbers up to fp32 rounding. Every tensor but
    the output is a view, and the common case (one row, rows that split evenly) is four calls: this runs ~25 times
    per decoded token, so each call saved is ~1 us a product (measured: 0.16 ms a token at 6L/384)."""
    N, K = weight.shape
    threads = torch.get_num_threads()
    splits = min(BLOCKS_PER_THREAD * threads, N // 32)
    if threads < 2 or splits < 2 or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    x = x.contiguous()
    rows = x.numel() // K
    whole = N - N % splits  # the rows that split evenly; a vocabulary like GPT-2's 50257 leaves a few
    # x as (splits, K, rows) with strides (0, 1, K): each block's right-hand side is x transposed, which MKL streams
    # the weight against; the same numbers stored (K, rows) contiguous take a path that reads at a fifth of the speed
    xt = x.as_strided((splits, K, rows), (0, 1, K))
    blocks = (weight if whole == N else weight[:whole]).view(splits, whole // splits, K)  # (splits, N / splits, K)
    if bias is None:
        y = torch.bmm(blocks, xt)  # (splits, N / splits, rows)
    else:
        y = torch.baddbmm((bias if whole == N else bias[:whole]).view(splits, -1, 1), blocks, xt)
    if whole == N and rows == 1:
        return y.view(*x.shape[:-1], N)  # (..., N): one row, already in order
    y = y.view(whole, rows)
    if whole < N:
        rest = F.linear(x.view(rows, K), weight[whole:], None if bias is None else bias[whole:])  # (rows, N - whole)
        y = torch.cat((y, rest.t()))  # (N, rows)
    return y.t().contiguous().view(*x.shape[:-1], N)  # (..., N)


def _register_op():
    """torch.ops.nanogpt_hf.decoding_linear, once per process (a saved model's copy of this file may load too)."""
    if hasattr(torch.ops.nanogpt_hf, "decoding_linear"):
        return
    op = torch.library.custom_op("nanogpt_hf::decoding_linear", _row_blocks_linear, mutates_args=())
    op.register_fake(lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.size(0)))


_register_op()
