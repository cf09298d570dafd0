"""Atomic file writes: readers see the old file or the complete new one, never a half-written one; and where a
tool will write, checked before its work."""

import contextlib
import os
import tempfile
import uuid

from .errors import UserError

__all__ = ["atomic_path", "check_writable_place"]


@contextlib.contextmanager
def atomic_path(path):
    """A temporary name next to path to write to: renamed onto path if the block completes, removed if not.

    The name is only reserved, not created (unlike tempfile.mkstemp, whose 0600 file would make the result
    unreadable to other users), so the file gets the usual permissions of the umask.
    """
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable_place(path, label):
    """Raises one UserError unless a file can be created where path is to be written (its folder, or the nearest
    folder above it that exists); label names it in the message (`--output x.json`). Checked by creating one, since os.access says yes to root in /proc. For a tool to
    call before its long work, so that a bad --output fails in a second, not after the evaluation."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{label}: nothing can be written in {folder} ({e.strerror or e}); choose another place") from e
