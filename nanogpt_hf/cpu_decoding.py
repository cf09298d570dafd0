"""Decoding's matrix-vector products on a CPU, each by the kernel this machine runs fastest, found by timing them.

Decoding multiplies a few rows (one per sequence) by every weight matrix: a product bound by reading the weight, and
how fast a CPU reads it depends on which BLAS routine runs. No routine wins everywhere (docs/performance.md):
- `linear`: F.linear (MKL's GEMM with the weight transposed). On an Intel Xeon with MKL 2024 it is multi-threaded and
  reads at 36-100 GB/s; on AMD EPYCs it runs on one core (15-21 GB/s for a 50k x 384 head).
- `mv`: torch.mv / addmv (MKL's GEMV), one row only: on an AMD EPYC without AVX-512, 1152 x 384 in 47 us against
  F.linear's 83.
- `row_blocks`: the weight's rows split in blocks, two a thread, multiplied by torch.bmm (MKL's strided batched GEMM
  runs the blocks in parallel, each a GEMV over contiguous rows): no copy, the blocks are a view. 55-72 GB/s for the
  head on an AVX-512 AMD EPYC; 13-28 GB/s, a third of F.linear's rate, on the Intel Xeon.
- `transposed`: a contiguous (in, out) copy of the weight, multiplied by addmm (GPT-2's Conv1D layout): 2.9 ms for the
  50k x 384 head on the AVX2 EPYC against 3.2 (row blocks) and 6.7 (F.linear); on the Xeon 1.7 against 2.2. It costs
  the weight's memory again, so it is a candidate only while the copies fit in a quarter of the memory available.
So nothing is chosen by a constant: the first time a product of a shape (the weight's and the input's, a bias) is
decoded, its calls go to each candidate in turn, timed where they run (the weight as cached as decoding leaves it),
and after SAMPLES calls each the candidate of the lowest median takes every later call of that shape, for the rest
of the process (torch.set_num_threads afterwards: `reset_choices()` times them again). NANOGPT_DECODING_KERNEL=<name> forces one candidate everywhere it applies (tests, comparisons);
`auto` (the default) measures. `chosen_kernels()` says what was chosen and the times behind it (nanogpt-bench prints
them).

The transposed copy follows the weight: it is made again when the weight's storage or version counter changes (an
optimizer step, load_state_dict, any in-place edit torch counts). An edit through `.data` is one torch does not count;
after such an edit call `forget_copies()`.

Under torch.compile the product is an opaque custom op, so that inductor keeps the layout the kernels stream
(inductor's own lowering of the row blocks' bmm copies the vector into another layout and reads at 11 GB/s).
"""

import contextlib
import math
import os
import statistics
import time

import torch
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["KERNEL_ENV", "KERNELS", "chosen_kernels", "decoding_linear", "forced_kernel", "forget_copies",
           "is_decoding_product"]

KERNEL_ENV = "NANOGPT_DECODING_KERNEL"
# A decoding step multiplies one row per sequence; past 16 rows the product is a GEMM, which F.linear is made for
MAX_ROWS = 16
SAMPLES = 8  # timed calls per candidate; the first of each is a warm-up and does not count
BLOCKS_PER_THREAD = 2  # the row blocks: two a thread keep both halves of each core's work in flight
COPY_SHARE = 4  # the transposed copies may take at most 1/COPY_SHARE of the memory available when a shape is timed


def is_decoding_product(x, weight):
    """Whether F.linear(x, weight) is a decoding step's product: fp32 on a CPU, outside autograd, at most MAX_ROWS
    rows. Every test is one torch.compile can trace."""
    return (x.numel() <= MAX_ROWS * x.size(-1) and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and not torch.is_grad_enabled())


def decoding_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for the products is_decoding_product accepts, by the kernel chosen for its shape.
    This runs ~25 times a decoded token: one dictionary lookup (measured: torch.get_num_threads() in the key cost 5%
    of the quickstart shape's tokens/s, so the threads are not part of it)."""
    if torch.compiler.is_compiling():
        return torch.ops.nanogpt_hf.decoding_linear(x, weight, bias)
    kernel = _forced or _CHOSEN.get((weight.shape, x.shape, bias is None))
    if kernel is not None:
        return kernel(x, weight, bias)
    return _trial_call(x, weight, bias)


# ------------------------------------------------------------------------------------------------- the kernels
def _mv_linear(x, weight, bias):
    """One row: MKL's GEMV on the weight as stored."""
    if x.numel() != x.size(-1):
        return F.linear(x, weight, bias)
    v = x.reshape(-1)  # (K,)
    y = torch.mv(weight, v) if bias is None else torch.addmv(bias, weight, v)  # (N,)
    return y.view(*x.shape[:-1], weight.size(0))  # (..., N)


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


def _transposed_linear(x, weight, bias):
    """x @ W^T with W^T a contiguous (K, N) copy of the weight, kept while the weight is unchanged."""
    if weight.is_inference():  # no version counter to follow it by
        return F.linear(x, weight, bias)
    N, K = weight.shape
    wt = _transposed_copy(weight)  # (K, N)
    x2 = x.reshape(-1, K)  # (rows, K)
    y = torch.mm(x2, wt) if bias is None else torch.addmm(bias, x2, wt)  # (rows, N)
    return y.view(*x.shape[:-1], N)  # (..., N)


KERNELS = {"linear": F.linear, "mv": _mv_linear, "row_blocks": _row_blocks_linear, "transposed": _transposed_linear}

# ------------------------------------------------------------------------------------------ the transposed copies
_COPIES = WeakIdKeyDictionary()  # weight -> (its storage pointer, its version, the (K, N) copy)


def _transposed_copy(weight):
    entry = _COPIES.get(weight)
    if entry is not None and entry[0] == weight.data_ptr() and entry[1] == weight._version:
        return entry[2]
    copy = weight.detach().t().contiguous()  # (K, N)
    _COPIES[weight] = (weight.data_ptr(), weight._version, copy)
    return copy


def _copied_bytes():
    return sum(entry[2].numel() * entry[2].element_size() for entry in _COPIES.values())


def forget_copies():
    """Drops every transposed copy (they are made again from the weights as they are now at the next use)."""
    _COPIES.clear()


def _available_memory():
    """Bytes the kernel reports available (MemAvailable); free pages where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------------- the choice
_CHOSEN = {}  # shape key -> the kernel chosen (the function: this runs ~25 times a token, every lookup counts)
_TRIALS = {}  # shape key -> {candidate's name: [seconds per timed call]}
_forced = None  # a kernel (function) while forced_kernel() is in effect; else the environment's


def _environment_kernel():
    name = os.environ.get(KERNEL_ENV, "auto").strip() or "auto"
    if name != "auto" and name not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}={name!r} is not a decoding kernel: use auto (measure) or one of "
                         f"{', '.join(KERNELS)}")
    return None if name == "auto" else KERNELS[name]


def _candidates(x, weight):
    """The kernels worth timing for this product on this machine: each one that runs it differently here."""
    names = ["linear"]
    if x.numel() == x.size(-1):
        names.append("mv")
    if torch.get_num_threads() >= 2 and weight.size(0) // 32 >= 2 and weight.is_contiguous():
        names.append("row_blocks")
    size = weight.numel() * weight.element_size()
    if not weight.is_inference() and _copied_bytes() + size <= _available_memory() / COPY_SHARE:
        names.append("transposed")
    return names


def _timed(name, x, weight, bias):
    """(kernel(x, weight, bias), its wall time in seconds). Tests replace this to inject timings."""
    t0 = time.perf_counter()
    y = KERNELS[name](x, weight, bias)
    return y, time.perf_counter() - t0


def _trial_call(x, weight, bias):
    """One call of a shape still being timed: the candidate with the fewest calls so far runs it; once every one
    has SAMPLES, the lowest median (warm-ups left out) takes the shape from then on."""
    key = (weight.shape, x.shape, bias is None)  # what a choice holds for (decoding_linear looks it up)
    trials = _TRIALS.get(key)
    if trials is None:
        trials = _TRIALS[key] = {name: [] for name in _candidates(x, weight)}
    # round r runs the candidates in turn starting from the r-th: the calls of one token come in layer order, so a
    # fixed order would time each candidate at the same layers every round (4 layers, 4 candidates: always the same)
    names = list(trials)
    calls = sum(len(times) for times in trials.values())
    name = names[(calls + calls // len(names)) % len(names)]
    y, seconds = _timed(name, x, weight, bias)
    trials[name].append(seconds)
    if all(len(times) >= SAMPLES for times in trials.values()):
        _CHOSEN[key] = KERNELS[fastest(trials)]
        transposed = KERNELS["transposed"]
        if not any(k[0] == key[0] and kernel is transposed for k, kernel in _CHOSEN.items()):
            for w in [w for w in _COPIES.keys() if w.shape == key[0]]:
                del _COPIES[w]  # this shape's copies served the timing only
    return y


TIE = 0.95  # another candidate replaces F.linear only if its median is at most this fraction of F.linear's


def fastest(trials):
    """The candidate whose timed calls (each list's first, a warm-up, left out) have the lowest median; F.linear
    where none is 5% faster than it: a difference within the timing's noise (7 calls each, timed as decoding runs)
    goes to the plain product, so the choice does not lose to F.linear by chance."""
    medians = {name: statistics.median(times[1:] or times) for name, times in trials.items()}
    best = min(medians, key=medians.get)
    return best if "linear" not in medians or medians[best] <= TIE * medians["linear"] else "linear"


def chosen_kernels():
    """{"N x K, R row(s)[, bias]": (chosen kernel, {candidate: median seconds})} for every shape decided in this
    process."""
    names = {kernel: name for name, kernel in KERNELS.items()}
    report = {}
    for key, kernel in _CHOSEN.items():
        (N, K), x_shape, no_bias = key
        rows = math.prod(x_shape[:-1])
        label = f"{N} x {K}, {rows} row{'s' if rows > 1 else ''}{'' if no_bias else ', bias'}"
        medians = {n: statistics.median(t[1:] or t) for n, t in _TRIALS.get(key, {}).items()}
        report[label] = (names[kernel], medians)
    return report


def reset_choices():
    """Forgets every choice and timing: the next call of each shape is timed again."""
    _CHOSEN.clear()
    _TRIALS.clear()
    forget_copies()


@contextlib.contextmanager
def forced_kernel(name):
    """Within the block every decoding product runs `name` (where it applies; F.linear where it does not)."""
    global _forced
    if name not in KERNELS:
        raise ValueError(f"{name!r} is not a decoding kernel: one of {', '.join(KERNELS)}")
    before, _forced = _forced, KERNELS[name]
    try:
        yield
    finally:
        _forced = before


def _register_op():
    """torch.ops.nanogpt_hf.decoding_linear, once per process (a saved model's copy of this file may load too)."""
    if hasattr(torch.ops.nanogpt_hf, "decoding_linear"):
        return
    op = torch.library.custom_op("nanogpt_hf::decoding_linear", decoding_linear, mutates_args=())
    op.register_fake(lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.size(0)))


_forced = _environment_kernel()
_register_op()
