"""What a run reports while it trains: the progress display, the journal (out_dir/log.jsonl) and the trackers.

The display suits where it runs: a tqdm bar in a terminal; nanoGPT's plain lines (`iter N: loss ..., time
...ms, mfu ...%`) every log_interval when stdout is a file or a CI log. Every other message goes through
`Progress.write`, so it never shares the bar's line. Only the main process shows anything.
"""

import contextlib
import io
import json
import math
import os
import re
import secrets
import sys

from tqdm.auto import tqdm

from .faults import fault_point

__all__ = ["Progress", "Journal", "init_trackers", "plain_output", "forget_ended_trackio_run"]


class Progress:
    def __init__(self, total, initial, enabled, stream=None):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.bar = None
        if enabled and self.stream.isatty():
            # a terminal that reports no size (a bare pty) would hide the bar: assume 80x24 there
            size = os.get_terminal_size(self.stream.fileno())
            sized = size.columns > 0 and size.lines > 0
            self.bar = tqdm(total=total, initial=initial, desc="training", dynamic_ncols=sized, file=self.stream,
                            ncols=None if sized else 80, nrows=None if sized else 24)

    def write(self, message):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def step(self):
        if self.bar is not None:
            self.bar.update(1)

    def report(self, iter_num, loss, lr, dt, mfu):
        """The log_interval line: in the bar's postfix in a terminal, as nanoGPT's line elsewhere. mfu None: not
        measured yet (the first steps), or no trustworthy peak (a GPU missing from hardware.GPU_PEAK_FLOPS; a step
        that beat the measured peak, said once by hardware.checked_peak)."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ms=f"{dt * 1000:.1f}",
                                 mfu="n/a" if mfu is None else f"{mfu * 100:.1f}%", refresh=False)
        else:
            mfu_text = "n/a" if mfu is None else f"{mfu * 100:.2f}%"
            self.write(f"iter {iter_num}: loss {loss:.4f}, time {dt * 1000:.2f}ms, mfu {mfu_text}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Journal:
    """out_dir/log.jsonl (always) plus Accelerate's trackers (W&B, TensorBoard, trackio), written by the main process.
    A failed write (disk full) does not raise here, where the other ranks would not know: `failed` holds the message
    and the trainer stops every rank at its next agreement."""

    def __init__(self, accelerator, run_dir):
        self.accelerator = accelerator
        self.path = run_dir.log_path
        self.file = run_dir.open_log() if accelerator.is_main_process else None
        self.failed = None

    def log(self, record):
        if self.file is None:
            return
        fault_point("log")
        # strict JSON (jq, JSON.parse): a non-finite value (a skipped step's loss) is null, never a bare NaN
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
        except OSError as e:
            self.failed = (f"cannot write the journal {self.path} ({e.strerror or e}): free disk space, then continue "
                           f"with init_from=auto (the checkpoints already written are intact)")
            self.close()
            return
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in record.items() if k != "iter" and v is not None}, step=record["iter"])

    def close(self):
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # the line buffer could not be flushed: already reported by log()
                pass
            self.file = None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def plain_output(stream=None):
    """What the trackers print (trackio's start-up and closing lines) as a log file should hold it: in a terminal as
    it is; elsewhere without colour codes and each line once (trackio 0.43 prints its closing line twice)."""
    stream = stream or sys.stdout
    if stream.isatty():
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        lines = _ANSI.sub("", captured.getvalue()).splitlines()
        for line in dict.fromkeys(lines):  # in order, once
            print(line, file=stream, flush=True)


def forget_ended_trackio_run():
    """Accelerate's trackio tracker ends its run with run.finish(), not trackio.finish(), so trackio still holds it
    as current and its exit handler finishes it a second time (a second closing line, a second upload)."""
    context = sys.modules.get("trackio.context_vars")
    if context is not None:
        context.current_run.set(None)


def init_trackers(accelerator, cfg, tracker_ids):
    """Starts W&B, TensorBoard and trackio; a resumed run continues the same W&B and trackio runs (their ids are kept
    in the checkpoint). trackio, a local dashboard with W&B's API, takes wandb_project and wandb_run_name too."""
    if not accelerator.log_with:
        return tracker_ids
    ids = dict(tracker_ids or {})
    init_kwargs = {}
    used = {getattr(t, "value", t) for t in accelerator.log_with}
    if "wandb" in used:
        ids.setdefault("wandb", secrets.token_hex(4))  # W&B run ids: lowercase letters and digits
        init_kwargs["wandb"] = {"name": cfg.wandb_run_name, "id": ids["wandb"], "resume": "allow", "dir": cfg.out_dir}
    if "trackio" in used:  # run names are unique within a trackio project: the name is the id
        ids.setdefault("trackio", f"{cfg.wandb_run_name}-{secrets.token_hex(3)}")
        init_kwargs["trackio"] = {"name": ids["trackio"], "resume": "allow"}
    scalars = {k: v for k, v in cfg.to_dict().items() if not isinstance(v, list)}
    try:
        with plain_output():
            accelerator.init_trackers(cfg.wandb_project, config=scalars, init_kwargs=init_kwargs)
    except Exception as e:  # wandb.errors.UsageError (no API key), CommError (no network): before any work is done
        if type(e).__module__.startswith("wandb"):
            from .errors import UserError

            raise UserError(f"W&B could not start ({type(e).__name__}: {str(e).splitlines()[0]}): run `wandb login` "
                            f"or set WANDB_API_KEY, or log offline with WANDB_MODE=offline") from e
        raise
    return ids
