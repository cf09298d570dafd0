"""Atomic file writes: readers see the old file or the complete new one, never a half-written one."""

import contextlib
import os
import uuid

__all__ = ["atomic_path"]


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
