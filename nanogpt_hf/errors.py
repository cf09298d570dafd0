"""User mistakes become one line on stderr and exit code 2; programming errors keep their traceback."""

import functools
import os
import signal
import sys
import time

__all__ = ["UserError", "cli_main", "first_line"]


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, prompt, flag): the message says how to fix it.
    Every rank of a multi-process run meets the same ones, so rank 0 alone prints them; every_rank=True is for what
    one rank alone knows (its peer died under it)."""

    def __init__(self, message, every_rank=False):
        super().__init__(message)
        self.every_rank = every_rank


# set by a stop signal (launch.StopSignals): the launcher that sent it is leaving already and waits for this process
stop_signal_received = False


def first_line(error, limit=200):
    """The first line of an exception's message, at most limit characters (a library's error can be pages long)."""
    return (str(error).strip().splitlines() or [""])[0][:limit]


def cli_main(main):
    """Decorator for console entry points: UserError -> `error: <message>` and exit 2, no traceback.

    Called with arguments (from Python), main's result comes back. Called bare, as console scripts and
    `python -m` call it, the result is dropped: the generated script runs `sys.exit(main())`, which would print
    a returned dict to stderr and exit 1 after a successful run.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars: noise around our own progress output
        try:
            result = main(*args, **kwargs)
            return result if args or kwargs else None
        except UserError as e:
            launcher = _accelerate_launcher()
            _say(f"error: {e}", e.every_rank)
            if launcher is not None and os.environ.get("LOCAL_RANK", "0") == "0" and not stop_signal_received:
                _stop_quietly(launcher)
            sys.exit(2)
        except KeyboardInterrupt:
            _say("interrupted")
            sys.exit(130)

    return wrapper


def _accelerate_launcher():
    """The pid of the `accelerate launch` that started this process, or None (python, plain torchrun, a notebook).

    Left alone, it turns a worker's exit on a user mistake into a traceback after the one `error:` line: ~20 lines
    of CalledProcessError from its one-process launcher, ~60 of ChildFailedError from the torchrun agent it runs in
    its own process for several (accelerate 1.16). Asked to stop with SIGTERM, either stops its workers with SIGTERM
    (what the agent sends them after a failure anyway; a worker still importing dies without a word) and exits 143
    without one; the agent logs a line per worker. Plain torchrun is left to report its failed workers: it prints a
    traceback for a signal too, and may be set to restart them."""
    if "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return None
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            command = f.read().split(b"\0")
    except OSError:
        return None
    return parent if any(b"accelerate" in word for word in command[:3]) else None


def _stop_quietly(launcher):
    """Asks the launcher to stop (from one worker per node: local rank 0), once the `error:` line has reached it."""
    sys.stderr.flush()
    _wait_until_relayed(sys.stderr.fileno())
    os.kill(launcher, signal.SIGTERM)
    time.sleep(5)  # the launcher stops this process as it leaves; a worker still here after that exits as usual


def _wait_until_relayed(fd, timeout=2.0):
    """accelerate 1.16's launcher reads its worker's stderr from a pipe and writes it on: a signal between its read
    and its write loses the chunk (the `error:` line), so wait until the pipe is empty, then a moment for the write.
    Where stderr is not a pipe (older launchers pass it through) there is nothing to wait for."""
    import fcntl
    import stat
    import struct
    import termios

    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]:
        time.sleep(0.01)
    time.sleep(0.2)


def _say(message, every_rank=False):
    """One line on stderr, from one process of a multi-process run (every rank leaves with the same error), and
    through tqdm so it never lands on a progress bar's line."""
    if int(os.environ.get("RANK", "0")) != 0 and not every_rank:
        # the launcher stops every worker when the first one exits: rank 0 must get to print the line first
        time.sleep(3)
        return
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
