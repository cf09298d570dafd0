"""The training loop behind train_accelerate.py: one Accelerate loop for CPU, one GPU, DDP, FSDP2 and multi-node.

It follows nanoGPT's train.py step for step (evaluate every eval_interval, checkpoint, accumulate, clip, step,
log), with Accelerate doing device placement, process groups, mixed precision and gradient accumulation.
The pieces around the loop live beside it: config.py (the typed config), resolve.py (the run resolved before
anything is built, and restored from its checkpoint), launch.py (processes, signals), optim.py (AdamW, Muon),
run_dir.py (out_dir), tracking.py (progress, journal, trackers), checkpoint.py (the checkpoint format).
"""

import dataclasses
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .config import SHAPE_KEYS, load_config
from .corpus import data_fingerprint
from .data import eval_batches, train_batches
from .errors import UserError, cli_main, first_line
from .faults import fault_point
from .hardware import checked_peak, native_bf16, peak_flops
from .hub import push_after_save, wait_for_pushes
from .launch import StopNow, StopSignals, check_launch, finish, launched_world_size, make_accelerator, together
from .optim import NS_DTYPES, configure_optimizer, get_lr, set_lr, skip_step_if
from .resolve import build_model, data_dir_of, resolve_run, restore_training_state
from .run_dir import RunDir
from .tokenization import tokenizer_signature
from .tracking import Journal, Progress, forget_ended_trackio_run, init_trackers, plain_output

__all__ = ["main", "train", "prepare", "TrainState"]


@dataclass
class TrainState:
    """What a checkpoint restores besides weights, optimizer, RNG streams and the data position."""

    iter_num: int = 0
    best_val_loss: float = 1e9
    best_checkpoint: str | None = None  # the name of the checkpoint folder with best_val_loss (in out_dir/checkpoints)
    val_loss: float | None = None  # of the latest evaluation
    train_loss: float | None = None  # of the latest evaluation
    eval_iter: int | None = None  # iteration of the latest evaluation
    tracker_ids: dict = field(default_factory=dict)  # W&B/trackio run ids: a resumed run continues the same run
    data: dict = field(default_factory=dict)  # the data's fingerprint (corpus.data_fingerprint): resume notices a change


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def estimate_loss(model, cfg, accelerator, iter_num):
    """Mean loss over exactly eval_iters batches per split, shared out across the ranks: each draw gives every
    rank its share of the batches one process would see. Every rank runs every forward (FSDP2 all-gathers inside
    it: a rank that skipped one would hang the others); the surplus of the last draw is counted with weight 0."""
    out = {}
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    for split in ("train", "val"):
        fault_point("eval")
        source = eval_batches(cfg, data_dir_of(cfg), split, iter_num, rank, world, accelerator.device.type == "cuda")
        total = torch.zeros(2, device=accelerator.device)  # (sum of batch losses, batches)
        for k in range(math.ceil(cfg.eval_iters / world)):
            x, y = (t.to(accelerator.device, non_blocking=True) for t in source.next_batch())
            with accelerator.autocast():
                loss = model(x, shift_labels=y, use_cache=False).loss.float()
            counted = float(k * world + rank < cfg.eval_iters)
            total += torch.stack([loss * counted, loss.new_tensor(counted)])
        total = accelerator.reduce(total, reduction="sum")
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


def _diverged(losses, vocab_size):
    """A non-finite loss, or one twice that of guessing uniformly (ln V, where every model starts): exploded."""
    return any(not math.isfinite(v) or v > 2 * math.log(vocab_size) for v in losses.values())


# ------------------------------------------------------------------------------------------- the loop
def train(cfg, sources=None):
    # the run resolved from files alone, before any Accelerator, process group, model or data
    cfg, ckpt, ckpt_state, notes = resolve_run(cfg, sources or {}, launched_world_size())
    check_launch(cfg)
    run = RunDir(cfg.out_dir)
    trackers = sorted(set(cfg.loggers) | ({"wandb"} if cfg.wandb_log else set()))
    accelerator, launch_warnings = make_accelerator(cfg, trackers)
    main, world, log = accelerator.is_main_process, accelerator.num_processes, accelerator.print
    for line in notes + [f"warning: {w}" for w in launch_warnings]:
        log(line)
    if accelerator.mixed_precision == "bf16" and not native_bf16(accelerator.device):
        log("warning: dtype=bfloat16 on this CPU (no AVX512-BF16/AMX) is emulated: training will be slower than "
            "with dtype=float32")

    # everything that can refuse the run, read-only, on every rank; then out_dir is taken: its lock, a clean and
    # writable folder (the main process alone touches out_dir)
    tokenizer, model = together(accelerator, lambda: build_model(cfg, ckpt, ckpt_state, log))

    together(accelerator, lambda: _take_out_dir(run, model, log) if main else None)
    torch.manual_seed(cfg.seed + accelerator.process_index)  # dropout differs per rank, like nanoGPT

    gas = cfg.gradient_accumulation_steps // world  # resolve_run made the total a multiple of the process count
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    optimizers, fused = configure_optimizer(model, cfg, NS_DTYPES.get(cfg.muon_ns_dtype, torch.float32))
    if len(optimizers) > 1 and accelerator.mixed_precision == "fp16":
        raise UserError("optimizer=muon does not work with float16's gradient scaler: use dtype=bfloat16 or float32")
    model, optimizers, raw_model = prepare(accelerator, model, optimizers)
    step_model = _compiled(model, cfg, log)  # what runs forwards; `model` is what is saved (no `_orig_mod.` names)
    pin = accelerator.device.type == "cuda"
    # the main process first: a streamed dataset is downloaded and cached once for all ranks
    train_source = together(accelerator, lambda: train_batches(cfg, data_dir_of(cfg), accelerator.process_index, world,
                                                               pin, log), main_first=True)
    state = TrainState(data=data_fingerprint(data_dir_of(cfg)) if cfg.data_source == "memmap" else {})
    if ckpt:
        restore_training_state(ckpt, raw_model, optimizers, train_source, accelerator.process_index, log)
        known = {f.name for f in dataclasses.fields(TrainState)}
        state = TrainState(**{**{k: v for k, v in ckpt_state.items() if k in known}, "data": state.data})
    resume_iter = state.iter_num if ckpt else None
    state.tracker_ids = together(accelerator, lambda: init_trackers(accelerator, cfg, state.tracker_ids))
    if main and not cfg.eval_only:  # the run is known to start: now out_dir is written
        run.rewind_log(resume_iter, log)
        run.write_config(cfg.to_dict())
    journal = Journal(accelerator, run)

    n_params = raw_model.get_num_params()
    peak_dtype = {"bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    peak = peak_flops(accelerator.device, dtype=peak_dtype)
    flops_per_iter = raw_model.flops_per_token(cfg.block_size) * tokens_per_iter / world  # per process (MFU per device)
    log(f"world size {world} ({accelerator.distributed_type.value}) | tokens per iteration will be: {tokens_per_iter:,} "
        f"({cfg.gradient_accumulation_steps} accumulation x {cfg.batch_size} batch x {cfg.block_size} block; "
        f"{gas} micro-steps per process)")
    log(f"number of parameters: {n_params / 1e6:.2f}M | device {accelerator.device} | precision "
        f"{accelerator.mixed_precision} | {f'Muon ({cfg.muon_ns_dtype}) + ' if len(optimizers) > 1 else ''}fused "
        f"AdamW {fused} | compile {cfg.compile} | data {cfg.data_source}")

    progress = Progress(cfg.max_iters, min(state.iter_num, cfg.max_iters), enabled=accelerator.is_local_main_process)
    say = progress.write  # every message from here on: never on the progress bar's line
    signals = StopSignals(interrupt=world == 1)  # one process: a stop signal abandons the step in progress

    def last_good():
        good = run.latest_checkpoint() if main else None
        return f"the last good checkpoint is {good}" if good else "no checkpoint was written"

    def evaluate_and_save(lr, final):
        with signals.interruptible():
            losses = estimate_loss(step_model, cfg, accelerator, state.iter_num)
        say(f"step {state.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if _diverged(losses, raw_model.config.vocab_size):
            raise UserError(f"training diverged: val loss {losses['val']:.4g} at iteration {state.iter_num}, so nothing "
                            f"was saved; {last_good()}: lower learning_rate (or raise warmup_iters) and resume")
        state.val_loss, state.train_loss, state.eval_iter = losses["val"], losses["train"], state.iter_num
        journal.log({"iter": state.iter_num, "train/loss_eval": losses["train"], "val/loss": losses["val"],
                     "val/perplexity": math.exp(min(losses["val"], 50)), "lr": lr})
        together(accelerator, _raise_if(journal.failed))
        is_best = losses["val"] < state.best_val_loss
        if is_best:
            state.best_val_loss = losses["val"]
        if (is_best or cfg.always_save_checkpoint or final) and state.iter_num > 0:
            if is_best:  # by name: the run folder may be moved or copied (a path would name the old place)
                state.best_checkpoint = os.path.basename(run.checkpoint_path(state.iter_num))
            checkpoint(final)

    def checkpoint(final, detach=False):
        say(f"saving checkpoint to {run.checkpoint_path(state.iter_num)}")
        started = time.perf_counter()
        record = dict(dataclasses.asdict(state), tokens_seen=state.iter_num * tokens_per_iter, world_size=world,
                      config=cfg.to_dict(), tokenizer=tokenizer_signature(tokenizer),
                      model_shape={k: getattr(raw_model.config, k) for k in SHAPE_KEYS})
        if not save_checkpoint(accelerator, model, optimizers, train_source, tokenizer, run, record, cfg.keep_last,
                               state.best_checkpoint, detach=detach):
            raise UserError(f"training diverged: weights are not finite at iteration {state.iter_num}, so nothing was "
                            f"saved; {last_good()}: lower learning_rate (or raise warmup_iters) and resume")
        timing["save"] = time.perf_counter() - started
        if main:
            push_after_save(cfg, "end" if final else "every_save", say, pushes)

    def stop_with_checkpoint(stop):
        """Checkpoints the last completed step (written by a detached process: launch.outliving_the_launcher), leaves."""
        saved = os.path.exists(os.path.join(run.checkpoint_path(state.iter_num), "MANIFEST.json"))
        if state.iter_num > 0 and not saved:
            checkpoint(final=False, detach=True)
        progress.close()
        log(f"stopped by {signal.Signals(stop).name} " + ("before the first step was complete: nothing to save" if
            not state.iter_num else f"at iteration {state.iter_num}: checkpoint {'on disk' if saved else 'written'}; "
            f"continue with init_from=resume (or the same command with init_from=auto)"))
        raise SystemExit(128 + stop)

    bad_steps, running_mfu, pending, alone, completed = 0, None, None, False, False
    pushes = []  # Hub pushes under way (processes of their own): the run does not wait for them until its end
    timing = {"save": 0.0}  # the last checkpoint's seconds
    model.train()
    t0 = time.perf_counter()
    try:
        if cfg.eval_only:  # one evaluation of the model as it is, then exit (nothing saved)
            losses = estimate_loss(step_model, cfg, accelerator, state.iter_num)
            say(f"step {state.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            return {"iter_num": state.iter_num, "val_loss": losses["val"], "train_loss": losses["train"]}
        try:
            while True:
                # where the last step left data and RNG streams: a step a stop signal abandons is undone to here
                step_start = (train_source.state_dict(), rng_state()) if signals.interrupt else None
                lr = get_lr(state.iter_num, cfg)
                set_lr(optimizers, lr)

                # evaluate the loss on train/val sets and write checkpoints; the last iteration always
                done = state.iter_num >= cfg.max_iters
                if (state.iter_num % cfg.eval_interval == 0 or done) and state.iter_num != resume_iter:
                    evaluate_and_save(lr, final=done)
                if done:
                    break

                # forward backward update, with optional gradient accumulation to simulate larger batch size
                step_loss, grad_norm, flags = optimizer_step(accelerator, model, step_model, optimizers, train_source,
                                                             gas, cfg.grad_clip, signals, journal.failed)
                # on a GPU the flags are read one step later, when they are long done; on a CPU they are ready now,
                # so a stop signal is acted on at the end of the step it arrived in
                flagged = (state.iter_num, *_to_host(flags))
                previous, pending = (pending, flagged) if flagged[2] is not None else (flagged, None)

                t1 = time.perf_counter()
                dt, t0 = t1 - t0, t1
                state.iter_num += 1
                progress.step()
                if (state.iter_num - 1) % cfg.log_interval == 0:
                    if peak and state.iter_num - 1 - (resume_iter or 0) >= 5:  # let the training loop settle a bit
                        peak = checked_peak(peak, flops_per_iter / dt, accelerator.device, peak_dtype, say)
                        if peak:
                            mfu_now = flops_per_iter / dt / peak
                            running_mfu = mfu_now if running_mfu is None else 0.9 * running_mfu + 0.1 * mfu_now
                    # mfu None: not known yet, or no trustworthy peak (an unknown GPU, a CPU's depressed measurement)
                    log_step(accelerator, journal, progress, state.iter_num - 1, step_loss, grad_norm, lr, dt,
                             tokens_per_iter, running_mfu if peak else None)
                if state.iter_num - (resume_iter or 0) > 2:  # past the first steps' warm-up
                    signals.say_if_grace_is_short(world, dt, timing["save"], say)
                bad_steps, stop = _act_on(previous, bad_steps, cfg, journal, signals, say, last_good)
                if stop:  # preemption, agreed by every rank: the step is done; checkpoint it and leave
                    stop_with_checkpoint(stop)
        except StopNow as stopped:  # one process: the step or evaluation in progress is dropped, nothing of it kept
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            model.train()
            train_source.load_state_dict(step_start[0])
            set_rng_state(step_start[1])
            stop_with_checkpoint(stopped.args[0])
        together(accelerator, _raise_if(journal.failed))
        progress.close()
        completed = True
        log(f"done: trained to iteration {state.iter_num}, val loss {state.val_loss:.4f} at iteration "
            f"{state.eval_iter} (best {state.best_val_loss:.4f}); {run.summary() if main else ''}")
        return {"iter_num": state.iter_num, "val_loss": state.val_loss, "best_val_loss": state.best_val_loss}
    except Exception as e:
        if isinstance(e, UserError):
            raise
        # an error of this process alone (a CUDA out-of-memory on one GPU, a bug): no collective after it, since the
        # other ranks wait in the step's all-reduce and would never join one; this process leaves at once, so the
        # launcher stops the others
        alone = world > 1
        failure = _failure(e, cfg, accelerator.process_index, world)
        if failure is e:
            raise
        raise failure from e
    finally:
        progress.close()
        signals.restore()
        journal.close()
        if not alone:  # ranks leave together; after an error of one rank, or a dead peer, a collective would hang
            with plain_output():  # the trackers' closing lines
                finish(accelerator)
            forget_ended_trackio_run()
        if completed and pushes:  # after the last collective: no other rank waits for the upload
            wait_for_pushes(pushes, cfg, log)
        run.release()


# ------------------------------------------------------------------------------------------- the loop's steps
def _take_out_dir(run, model, log):
    """The main process takes out_dir: its lock, a writable folder with room for a checkpoint (a warning if not),
    the leftovers of interrupted writes removed, the model folder repaired from the newest checkpoint."""
    run.acquire()
    run.probe_writable()
    # a checkpoint holds the weights, AdamW's two moments and a copy for the model folder (fp32)
    need = 4 * 4 * sum(p.numel() for p in model.parameters())
    if run.free_bytes() < 2 * need:
        log(f"warning: {run.free_bytes() / 1e6:.0f} MB free in {run.path}, a checkpoint needs about {need / 1e6:.0f} "
            f"MB: saves may fail (the run would stop with the previous checkpoint intact)")
    for line in run.clean_leftovers():
        log(line)
    run.repair_model(log)


def optimizer_step(accelerator, model, step_model, optimizers, train_source, gas, grad_clip, signals, journal_failed):
    """One iteration's forward and backward over gas micro-batches, the clip, and the optimizers' step. Returns
    (the mean loss, the gradient norm, the flags every rank agreed on), all on the device: the host reads nothing.
    Before the optimizers' step only gradients, data position and RNG change: a stop signal may abandon that part."""
    loss_sum = torch.zeros((), device=accelerator.device)
    with signals.interruptible():
        for _ in range(gas):
            fault_point("step")
            x, y = (t.to(accelerator.device, non_blocking=True) for t in train_source.next_batch())
            with accelerator.accumulate(model), accelerator.autocast():
                loss = step_model(x, shift_labels=y, use_cache=False).loss
                accelerator.backward(loss)  # divided by the per-process accumulation inside
            loss_sum += loss.detach().float()
        grad_norm = _plain(accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf")))
        step_loss = loss_sum / gas
        # one reduction decides for every rank: a non-finite loss or gradient anywhere skips the step everywhere (on
        # the device, where the optimizers can: no waiting for the GPU); a stop signal or a failed journal write
        # anywhere stops every rank
        flags = _agree(accelerator, step_loss, grad_norm, signals.received, journal_failed)
    bad = (flags[0] > 0).float()  # 0/1: fused AdamW's found_inf must be exactly 1 to skip
    if accelerator.scaler is not None or skip_step_if(optimizers, bad) or bad.item() == 0:
        for optimizer in optimizers:
            optimizer.step()  # with fp16 the gradient scaler skips overflowing steps itself
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, flags


def log_step(accelerator, journal, progress, iter_num, step_loss, grad_norm, lr, dt, tokens_per_iter, mfu):
    """nanoGPT's log line and the journal's record of an iteration (strict JSON: a skipped step's loss and gradient
    norm are null, and it says skipped)."""
    lossf = accelerator.reduce(step_loss, reduction="mean").item()
    norm = grad_norm.item()
    skipped = {"skipped": True} if not (math.isfinite(lossf) and math.isfinite(norm)) else {}
    journal.log({"iter": iter_num, "train/loss": lossf, "lr": lr, "grad_norm": norm, "time_ms": dt * 1000,
                 "tokens_per_s": tokens_per_iter / dt, "mfu": mfu, **skipped})
    progress.report(iter_num, lossf, lr, dt, mfu)


def _failure(e, cfg, rank, world):
    """What an exception in the loop becomes: one line every rank prints for a dead peer, a failed compile or an
    error of this rank alone (its traceback with NANOGPT_TRACEBACK=1), else the exception itself."""
    if world > 1 and _is_peer_failure(e):
        return UserError(f"another process of this run stopped ({first_line(e, 160)}): its launcher says which and "
                         f"why; continue with init_from=auto", every_rank=True)
    if cfg.compile and _is_compile_failure(e):
        return UserError(f"torch.compile failed ({type(e).__name__}: {first_line(e, 200)}): train without it, "
                         f"--compile=false", every_rank=world > 1)
    if world > 1 and os.environ.get("NANOGPT_TRACEBACK") != "1":
        return UserError(f"rank {rank} stopped the run: {type(e).__name__}: {first_line(e, 300)} (NANOGPT_TRACEBACK=1 "
                         f"shows the traceback); continue with init_from=auto", every_rank=True)
    return e


def prepare(accelerator, model, optimizers):
    """Accelerate's preparation (device, DDP or FSDP2), minus the wrapper it puts around forward under mixed
    precision: autocast plus a full fp32 copy of the outputs, the logits included, at every micro-step (2.5 GB at
    train_gpt2's batch). The loop autocasts itself and needs the loss, which transformers' loss function computes in
    fp32. Returns (model, optimizers, the model unwrapped)."""
    model, *optimizers = accelerator.prepare(model, *optimizers)
    return model, optimizers, accelerator.unwrap_model(model, keep_fp32_wrapper=False)


def _compiled(model, cfg, log):
    """torch.compile of the prepared model (after DDP/FSDP wrapping, as Accelerate does), or the model itself.
    A compile error surfaces at the first forward and stops the run with one line (train: _is_compile_failure)."""
    if not cfg.compile:
        return model
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        log("warning: compile=True but torch.compile is not supported on this Python/platform: training without it")
        return model
    log("compiling the model... (takes a ~minute)")
    # dynamo, tracing DDP's forward, notes once per rank that it skips DDP's profiler range: nothing to act on
    logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(_not_profiler_note)
    return torch.compile(model)


def _not_profiler_note(record):
    return not record.getMessage().startswith("Profiler record function")


def _is_compile_failure(e):
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(e, TorchDynamoException) or type(e).__module__.startswith(("torch._inductor", "torch._dynamo"))


def _is_peer_failure(e):
    text = str(e)
    return isinstance(e, torch.distributed.DistError) or any(s in text for s in ("gloo", "NCCL", "Connection closed by peer"))


def _plain(t):
    """A plain tensor of a DTensor (FSDP2's grad norm is a replicated DTensor: reductions and .item() refuse it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _agree(accelerator, loss, grad_norm, stop_signal, journal_failed):
    """[bad values, stop signals, journal failures], summed over the ranks, on the device: built with kernels from
    host scalars (torch.full), never read back here."""
    device = loss.device
    bad = (~torch.isfinite(loss)).float() + (~torch.isfinite(grad_norm.to(device).float())).float()
    flags = torch.stack([bad, torch.full((), float(stop_signal > 0), device=device),
                         torch.full((), float(journal_failed is not None), device=device)])
    return accelerator.reduce(flags, reduction="sum") if accelerator.num_processes > 1 else flags


def _to_host(flags):
    """The flags copied to the host without waiting (pinned memory on a GPU) and an event to wait on when read."""
    if flags.device.type != "cuda":
        return flags, None
    event = torch.cuda.Event()
    host = flags.to("cpu", non_blocking=True)
    event.record()
    return host, event


def _act_on(previous, bad_steps, cfg, journal, signals, say, last_good):
    """The previous step's flags, read now: (bad steps in a row, stop signal or 0; a rank that did not get the
    signal stops as for SIGTERM). Raises after max_bad_steps non-finite steps in a row, or when the journal could not
    be written on some rank."""
    if previous is None:
        return bad_steps, 0
    iter_num, host, event = previous
    if event is not None:
        event.synchronize()  # done long ago: the GPU is already on the next step
    bad, stop, journal_failed = host.tolist()
    if journal_failed:
        raise UserError(journal.failed or "the main process could not write the journal: see its message")
    if bad:
        bad_steps += 1
        say(f"warning: non-finite loss or gradient at iter {iter_num}: step skipped ({bad_steps} in a row)")
        if bad_steps >= cfg.max_bad_steps:
            raise UserError(f"{bad_steps} non-finite steps in a row at iter {iter_num}: training diverged; {last_good()}: "
                            f"lower learning_rate, raise warmup_iters or enable grad_clip, then resume from it")
    else:
        bad_steps = 0
    return bad_steps, (signals.received or signal.SIGTERM) if stop else 0


def _raise_if(message):
    def check():
        if message:
            raise UserError(message)
    return check


@cli_main
def main(argv=None):
    cfg, sources = load_config(sys.argv[1:] if argv is None else argv)
    return train(cfg, sources)


if __name__ == "__main__":
    main()
