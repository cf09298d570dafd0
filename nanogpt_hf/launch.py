"""Processes and devices: the Accelerator, the process group, precision, and how the ranks stop together.

What runs where is chosen by the launcher (`accelerate launch --config_file accelerate_configs/...`, torchrun, or
plain python), never by the trainer: this module only checks that the launcher got what it asked for.
"""

import contextlib
import ctypes
import dataclasses
import datetime
import math
import os
import signal
import time

import torch

from .errors import UserError
from .hardware import keep_freed_memory_mapped

__all__ = ["make_accelerator", "round_accumulation", "together", "finish", "StopSignals"]


def _precision(dtype, on_gpu, warn):
    """Accelerate's mixed_precision for the dtype key, with a warning and a working fallback where unsupported."""
    if dtype == "auto":
        if not on_gpu:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if dtype == "bfloat16" and on_gpu and not torch.cuda.is_bf16_supported():
        warn("dtype=bfloat16: this GPU does not support bf16; using float16 with a gradient scaler instead")
        return "fp16"
    if dtype == "float16" and not on_gpu:
        warn("dtype=float16 needs a GPU (its gradient scaler is CUDA-only); training in float32 on the CPU instead")
        return "no"
    return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[dtype]


def _die_with_parent():
    """A worker started by a launcher gets SIGTERM when the launcher dies (Linux), so a killed `accelerate launch`
    never leaves an orphan that keeps training; the SIGTERM handler then saves a checkpoint first."""
    launched = "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ  # torchrun / accelerate launch
    if not launched or not os.path.exists("/proc/self"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def make_accelerator(cfg, trackers):
    """The Accelerator for cfg.device/dtype. On CPU, cpu=True under a multi-process launcher gives real DDP over
    gloo (MULTI_CPU); see PLATFORM_NOTES. Returns (accelerator, cfg, warnings): cfg with the accumulation rounded
    to the process count, warnings for the main process to show."""
    from accelerate import Accelerator, PartialState

    on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda, but no CUDA GPU is visible; use device=auto or device=cpu")
    _check_launch_file_device(cfg)
    _die_with_parent()
    _join_elastic_restart(on_gpu)
    try:
        state = PartialState(cpu=not on_gpu)
    except ValueError as e:  # e.g. WORLD_SIZE set by hand without MASTER_ADDR
        raise UserError(f"cannot join the process group: {str(e).splitlines()[0]} (launch with accelerate launch or "
                        f"torchrun)") from e
    world = state.num_processes
    _check_world_size(world)
    warnings = []
    gas = round_accumulation(cfg.gradient_accumulation_steps, world)
    if gas != cfg.gradient_accumulation_steps:
        warnings.append(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not a multiple of the {world} "
                        f"processes: using {gas} ({gas * cfg.batch_size * cfg.block_size:,} tokens per iteration)")
        cfg = dataclasses.replace(cfg, gradient_accumulation_steps=gas)
    if not on_gpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        warnings.append("this launch file asks for FSDP, which Accelerate runs on GPUs only: the CPU processes train "
                        "with DDP (every process holds the whole model)")
    precision = _precision(cfg.dtype, on_gpu, warnings.append)
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=precision, gradient_accumulation_steps=gas // world,
                              log_with=trackers or None, project_dir=cfg.out_dir)
    if not on_gpu:
        keep_freed_memory_mapped()  # no per-step page faults for the step's big temporaries (hardware.py)
    return accelerator, cfg, warnings


def _check_launch_file_device(cfg):
    """A GPU launch file on a machine without GPUs would silently train on the CPU (in fp32, as many CPU processes
    as it names GPUs): stop, unless the CPU was asked for explicitly (--device=cpu)."""
    by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    cpu_file = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if by_accelerate and not cpu_file and not torch.cuda.is_available() and cfg.device != "cpu":
        raise UserError("this accelerate launch file is for GPUs, but no CUDA GPU is visible: use "
                        "accelerate_configs/cpu.yaml or cpu_ddp.yaml, or add --device=cpu to train on the CPU anyway")


def round_accumulation(gas, world):
    """gradient_accumulation_steps is the total over all processes, like nanoGPT's; when the process count does
    not divide it, round it up to the next multiple (more tokens per iteration, never fewer)."""
    return math.ceil(gas / world) * world


def _join_elastic_restart(on_gpu):
    """After a torchrun --max-restarts restart, the agent's store still holds the keys of the failed attempt and
    the new workers hang connecting to dead peers (seen with gloo, torch 2.13). Join under a per-attempt prefix."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=datetime.timedelta(minutes=5))
    dist.init_process_group("nccl" if on_gpu else "gloo", store=dist.PrefixStore(f"nanogpt/attempt{attempt}/", store),
                            rank=rank, world_size=world)


def _check_world_size(world):
    """Several Accelerate misconfigurations silently start duplicate single-process runs: refuse them."""
    asked = int(os.environ.get("WORLD_SIZE", "1"))
    if asked != world:
        raise UserError(
            f"the launcher started {asked} processes but this one is not part of a process group (world size {world}): "
            f"each would train alone. On CPU use accelerate_configs/cpu_ddp.yaml (or torchrun); on GPUs check the "
            f"accelerate config")


def together(accelerator, fn, main_first=False):
    """Runs fn on every rank (the main process first, if asked: it reads or caches data once for all); if it
    raises a UserError on any rank, every rank leaves with that message (printed once, by the main process)
    instead of one rank leaving and the others dying in a collective."""
    error, result = None, None
    with accelerator.main_process_first() if main_first else contextlib.nullcontext():
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    if accelerator.num_processes == 1:
        if error is not None:
            raise UserError(error)
        return result
    import torch.distributed as dist

    messages = [None] * accelerator.num_processes
    dist.all_gather_object(messages, error)
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise UserError(first)
    return result


def finish(accelerator):
    accelerator.wait_for_everyone()  # ranks leave together: a rank tearing down gloo early can hang its peer
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # torch 2.13 + gloo: gloo's work thread frees the last collectives' tensors after they have returned and
        # needs the GIL to do it. If the DDP model is freed first (under the GIL, when train() returns),
        # ~ProcessGroupGloo joins that thread and both wait forever (seen with gdb in a restarted torchrun worker).
        # Sleeping releases the GIL so the thread can finish first.
        time.sleep(0.2)


class StopSignals:
    """SIGTERM (what SLURM and Kubernetes send before a kill) and SIGINT (Ctrl-C) ask the loop to finish its step
    and checkpoint; a second Ctrl-C stops at once. `received` is the signal number, or 0."""

    def __init__(self):
        self.received = 0
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
