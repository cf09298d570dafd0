"""Test hooks for the crash and stop tests: a process killed, failing or slow at a named point of its work.

The names are the places the trainer passes (`step`, `eval`, `checkpoint`, `checkpoint_manifest`, `publish`, ...);
nothing happens unless one of the variables below is set.
"""

import os
import signal
import time

__all__ = ["fault_point"]


def fault_point(name):
    """Test hooks for the crash tests, on rank NANOGPT_KILL_RANK (0 by default): NANOGPT_KILL_AT=name (or name@N for
    the N-th time) SIGKILLs this process right here, exactly like a power cut or the OOM killer would;
    NANOGPT_RAISE_AT=name@N raises a RuntimeError there, as a CUDA out-of-memory error on one GPU does;
    NANOGPT_DELAY_AT=name:seconds waits there every time, like a slow disk, name@N:seconds the N-th time only, like
    one long step (a comma list: several), on every rank or on NANOGPT_DELAY_RANK's alone; an absolute path in place
    of the seconds waits until that file exists (a test holds the run there exactly as long as it needs). Does
    nothing unless a variable is set."""
    delay_rank = os.environ.get("NANOGPT_DELAY_RANK")
    delays = os.environ.get("NANOGPT_DELAY_AT", "") if delay_rank in (None, os.environ.get("RANK", "0")) else ""
    for delay in filter(None, delays.split(",")):
        where, _, seconds = delay.partition(":")
        label, _, nth = where.partition("@")
        if label == name:
            count = fault_point.counts[where] = fault_point.counts.get(where, 0) + 1
            if not nth or count == int(nth):
                _wait(seconds)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:  # an elastic restart runs clean
        return
    for variable in ("NANOGPT_KILL_AT", "NANOGPT_RAISE_AT"):
        label, _, nth = os.environ.get(variable, "").partition("@")
        if label != name:
            continue
        count = fault_point.counts.get(variable, 0) + 1
        fault_point.counts[variable] = count
        if count == int(nth or 1) and int(os.environ.get("RANK", "0")) == int(os.environ.get("NANOGPT_KILL_RANK", "0")):
            if variable == "NANOGPT_RAISE_AT":
                raise RuntimeError(f"injected fault at {name}@{count} (NANOGPT_RAISE_AT)")
            os.kill(os.getpid(), signal.SIGKILL)


fault_point.counts = {}


def _wait(seconds_or_path):
    """NANOGPT_DELAY_AT's wait: that many seconds, or until the file at that absolute path exists."""
    if not seconds_or_path.startswith("/"):
        time.sleep(float(seconds_or_path))
        return
    while not os.path.exists(seconds_or_path):
        time.sleep(0.05)
