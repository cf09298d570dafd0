"""Processes and devices: the Accelerator, the process group, precision, and how the ranks stop together.

What runs where is chosen by the launcher (`accelerate launch --config_file accelerate_configs/...`, torchrun, or
plain python), never by the trainer: this module only checks that the launcher got what it asked for.
"""

import contextlib
import ctypes
import datetime
import math
import os
import signal
import time

import torch

from . import errors
from .errors import UserError
from .hardware import keep_freed_memory_mapped

__all__ = ["make_accelerator", "check_launch", "launched_world_size", "on_gpu", "round_accumulation", "together", "finish",
           "StopSignals", "StopNow", "outliving_the_launcher", "stop_grace_shortfall"]

# the process that started this one, as it was when the trainer was imported: a launcher that is PID 1 (a container's
# entrypoint, `docker run IMAGE torchrun ...`) is our parent then, and a parent that changes later has died
_PARENT_AT_START = os.getppid()


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
    if _orphaned():  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _orphaned(parent_at_start=None):
    """Whether the launcher that started this worker is gone: the parent changed since start-up, or was already
    init when the trainer was imported. A launcher that is PID 1 itself (a container's entrypoint, a pod with no
    init) is a parent like any other: PID 1 whose command line is a Python launcher is not init."""
    start = _PARENT_AT_START if parent_at_start is None else parent_at_start
    if os.getppid() != start:
        return True
    return start == 1 and not _is_python_launcher(1)


def _is_python_launcher(pid):
    """Whether process pid runs Python, accelerate or torchrun (by its command line)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")[:4]
    except OSError:
        return False
    return any(name in os.path.basename(word) for word in words for name in (b"python", b"accelerate", b"torchrun"))


def launched_world_size():
    """The number of processes the launcher started (torchrun and accelerate launch set WORLD_SIZE): known before any
    process group exists, so the run's config can be resolved for it first."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def on_gpu(cfg):
    return cfg.device != "cpu" and torch.cuda.is_available()


def check_launch(cfg):
    """Launch mistakes that would otherwise train the wrong thing silently (for the resolved run's device), refused
    before anything is built."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda, but no CUDA GPU is visible; use device=auto or device=cpu")
    _check_launch_file_device(cfg)
    _check_single_process_launch()


def make_accelerator(cfg, trackers):
    """The Accelerator for the resolved cfg (its accumulation already a multiple of the process count). On CPU,
    cpu=True under a multi-process launcher gives real DDP over gloo (MULTI_CPU); see PLATFORM_NOTES. Under an FSDP
    launch file, PyTorch's FSDP2 with Accelerate's preparation, gradients reduced in fp32. Returns (accelerator,
    warnings for the main process to show)."""
    from accelerate import Accelerator, PartialState

    gpu = on_gpu(cfg)
    _die_with_parent()
    _join_elastic_restart(gpu)
    try:  # the process group: its collectives wait ddp_timeout for a peer (torch's defaults: NCCL 10 min, gloo 30)
        state = PartialState(cpu=not gpu, timeout=datetime.timedelta(seconds=cfg.ddp_timeout))
    except ValueError as e:  # e.g. WORLD_SIZE set by hand without MASTER_ADDR
        raise UserError(f"cannot join the process group: {str(e).splitlines()[0]} (launch with accelerate launch or "
                        f"torchrun)") from e
    world = state.num_processes
    _check_world_size(world)
    warnings = []
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and not gpu and os.environ.get(FSDP_ON_CPU) == "1":
        # TEST SEAM (tests/test_sharded.py): Accelerate picks FSDP only for GPU process groups; this one line
        # lets its own FSDP2 preparation run on a gloo CPU group. Nothing else about the run changes.
        from accelerate.utils import DistributedType

        state.distributed_type = DistributedType.MULTI_GPU
    elif fsdp and not gpu:
        fsdp = False
        warnings.append("this launch file asks for FSDP, which Accelerate runs on GPUs only: the CPU processes train "
                        "with DDP (every process holds the whole model)")
    if fsdp and os.environ.get("FSDP_VERSION", "2") != "2":
        raise UserError("this launch file asks for FSDP1; the trainer runs PyTorch's FSDP2 (its checkpoints gather "
                        "DTensor shards): set fsdp_version: 2, as accelerate_configs/fsdp.yaml does")
    precision = _precision(cfg.dtype, gpu, warnings.append)
    if gpu:
        enable_tf32()
    accelerator = Accelerator(cpu=not gpu, mixed_precision=precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps // world,
                              log_with=trackers or None, project_dir=cfg.out_dir,
                              fsdp_plugin=_fsdp_plugin(precision) if fsdp else None)
    if not gpu:
        keep_freed_memory_mapped()  # no per-step page faults for the step's big temporaries (hardware.py)
    return accelerator, warnings


FSDP_ON_CPU = "NANOGPT_TEST_FSDP_ON_CPU"


def enable_tf32():
    """TF32 tensor cores for the fp32 matmuls and convolutions of a GPU run (Ampere and newer; nanoGPT sets the same):
    dtype=float32 on a GPU would otherwise run at a fraction of the card's speed."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _fsdp_plugin(precision):
    """FSDP2 settings from the launch file (Accelerate reads its FSDP_* variables), with one change to Accelerate's
    mixed precision: parameters are gathered in bf16/fp16 for compute, but gradients are reduced (and accumulated
    across micro-steps) in fp32, and outputs are not cast, so the loss (computed in fp32 by transformers' loss
    function) is not rounded to bf16 and no fp32 copy of the logits is made."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=None)
    return FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy=policy)


def _check_single_process_launch():
    """`accelerate launch` of a config asking for several CPU processes (distributed_type MULTI_CPU, what `accelerate
    config` writes for "multi-CPU"; or --cpu --num_processes N) starts ONE plain process unless mpirun is configured:
    its simple launcher exports MASTER_ADDR for the processes it meant to start but no WORLD_SIZE. Stop instead of
    training alone."""
    env = os.environ
    if "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env and "LOCAL_RANK" not in env:
        raise UserError("this accelerate launch asked for several processes but started one (Accelerate's MULTI_CPU "
                        "launch runs a single process unless mpirun is configured): for DDP on CPUs use "
                        "`accelerate launch --config_file accelerate_configs/cpu_ddp.yaml` or `torchrun "
                        "--nproc_per_node N`; for one process, a config with num_processes: 1")


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


class StopNow(BaseException):
    """Raised by a stop signal inside an interruptible region (StopSignals.interruptible): the work in progress is
    abandoned. A BaseException, so that no `except Exception` on the way keeps it from reaching the loop."""


class StopSignals:
    """SIGTERM (what SLURM and Kubernetes send before a kill) and SIGINT (Ctrl-C) stop the run with a checkpoint of
    its last completed step; a second Ctrl-C stops at once. `received` is the signal number, or 0.

    With several processes every rank must leave the step's collectives together, so the signal is agreed on at the
    step's end (the loop reads `received`). With one (interrupt=True) nothing is shared: inside an interruptible()
    block, the forward and backward of a step or an evaluation, the signal raises StopNow at once and that work is
    dropped (it changed no weight), so the checkpoint starts within a fraction of a second of the signal, however
    long a step or an evaluation takes."""

    def __init__(self, interrupt=False):
        self.received = 0
        self.interrupt = interrupt
        self._interruptible = self._grace_said = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        errors.stop_signal_received = True  # a refusal from here on: the launcher need not be asked to stop
        if self._interruptible:
            self._interruptible = False
            raise StopNow(signum)

    @contextlib.contextmanager
    def interruptible(self):
        """A block whose work a stop signal may abandon (one process only; elsewhere a plain block)."""
        if self.interrupt and self.received:
            raise StopNow(self.received)  # it came between two blocks
        self._interruptible = self.interrupt
        try:
            yield
        finally:
            self._interruptible = False

    def say_if_grace_is_short(self, world, step_seconds, save_seconds, say):
        """The line of stop_grace_shortfall, once a run."""
        line = None if self._grace_said else stop_grace_shortfall(world, step_seconds, save_seconds)
        if line:
            say(line)
            self._grace_said = True

    def restore(self):
        self._interruptible = False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def stop_grace():
    """(seconds, who, how to give more) for the launcher this worker runs under: how long it waits, after passing a
    stop signal on, before it kills this process; None without a launcher (python, a notebook) or an unknown one.
    torch's elastic agent (torchrun, multi-process accelerate launch): TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by
    default; accelerate 1.16's one-process launcher: 5 s, not configurable."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return (float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")), "torch's elastic agent",
                "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=<seconds> before launching (torchrun: --shutdown_timeout)")
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        return 5.0, "accelerate's one-process launcher", "run the trainer itself (python train_accelerate.py ...)"
    return None


def stop_grace_shortfall(world, step_seconds, save_seconds):
    """One line when a stop signal could not be honoured within the launcher's grace, else None. What must fit: with
    several processes the step in progress (they agree at its end) and the save's part before its writer is
    detached; with one, nothing (the step is abandoned, the writer detached at once) unless the launcher is PID 1,
    a container's entrypoint, whose exit ends every process of the container, the writer included: then the save."""
    grace = stop_grace()
    if grace is None:
        return None
    seconds, who, how = grace
    container = _PARENT_AT_START == 1
    need = (step_seconds if world > 1 else 0.0) + (save_seconds if world > 1 or container else 0.0)
    if need <= seconds:
        return None
    parts = ([f"a step takes {step_seconds:.1f} s"] if world > 1 else []) + (
        [f"a checkpoint {save_seconds:.1f} s"] if save_seconds and (world > 1 or container) else [])
    return (f"warning: {' and '.join(parts)}, more than the {seconds:.0f} s {who} waits after a stop signal before it "
            f"kills this run{' (PID 1: its exit ends the container)' if container else ''}: a stop signal would "
            f"end it without a checkpoint of the step it is on; to give it time, {how}")


def outliving_the_launcher(fn, on_disk=None):
    """Runs fn in a detached writer process and waits for it; fn's UserError is raised here. The writer is forked
    twice (its parent exits at once), so it is no descendant of this process: nothing a launcher kills, now or later,
    reaches it. accelerate 1.16's one-process launcher lists the process tree when SIGTERM reaches it and kills that
    list 5 s later, or at once on a second SIGTERM; torch's elastic agent (torchrun, multi-process accelerate launch)
    kills its workers' process groups after its shutdown timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s): the writer
    is in neither, in a session of its own, so the checkpoint a stop signal asks for is completed even when this
    process is killed while waiting (the writer holds out_dir's lock until it is done). Not beyond what ends every
    process at once: a scheduler that kills a job's whole cgroup (SLURM after KillWait, Kubernetes after
    terminationGracePeriodSeconds), a container whose PID 1 exits (docs/robustness.md says how to give the run time).

    The writer's hygiene: one intra-op thread (a forked child's parallel op can hang forever on the OpenMP pool its
    parent used), no GPU device descriptors (they would hold this process's GPU memory until it exits), stdio on
    /dev/null (the launcher's pipes are gone once it exits). fn must use no GPU and no collective. A writer killed
    before it is done (the OOM killer) is one UserError: on_disk() says what is on disk then. Without fork (Windows)
    fn runs here."""
    if not hasattr(os, "fork"):
        return fn()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the intermediate: a session of its own, the writer forked, out at once
        os.close(read)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        _run_writer(fn, write)
    os.close(write)
    os.waitpid(pid, 0)  # the intermediate: its exit makes the writer init's (or a subreaper's) child
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read().decode(errors="replace")
    writer, _, rest = report.partition("\n")
    code, _, message = rest.partition("\n")
    if code == "2":
        raise UserError(message)
    if code == "1":
        raise RuntimeError(f"the checkpoint writer (pid {writer}) failed:\n{message}")
    if code != "0":  # the pipe closed with no word: the writer was killed
        raise UserError(f"the checkpoint writer (pid {writer or '?'}) was killed before it finished "
                        f"(the OOM killer?); {on_disk() if on_disk else 'nothing more was written'}")


def _run_writer(fn, write):
    """The detached writer: its pid into the pipe, fn, then its result (0, 1 and a traceback, 2 and a UserError's
    text), and out without the parent's exit handlers."""
    code, message = 0, ""
    try:
        os.write(write, f"{os.getpid()}\n".encode())
        writer_hygiene()
        fn()
    except UserError as e:
        code, message = 2, str(e)
    except BaseException:  # a bug: its traceback goes to the parent, which raises it
        import traceback

        code, message = 1, traceback.format_exc()
    finally:
        with contextlib.suppress(OSError):
            os.write(write, f"{code}\n{message}".encode())
        os._exit(code)


GPU_DEVICES = ("/dev/nvidia", "/dev/dri/", "/dev/kfd")  # NVIDIA's driver, AMD ROCm's


def writer_hygiene():
    """What a forked writer does first: one intra-op thread, the descriptors of GPU devices (paths starting with one
    of GPU_DEVICES) closed, stdio on /dev/null."""
    torch.set_num_threads(1)
    close_descriptors(GPU_DEVICES)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def close_descriptors(prefixes):
    """Closes this process's file descriptors whose target path starts with one of prefixes; returns how many."""
    closed = 0
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(prefixes):
            with contextlib.suppress(OSError):
                os.close(int(name))
                closed += 1
    return closed
