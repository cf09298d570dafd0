"""Where model files come from: a local folder or a Hub repository (downloaded, or the offline cache). Shared by
model_io.py (configs and weights) and tokenization.py (tokenizer files), which import it and not each other."""

import contextlib
import functools
import json
import os
import socket
import sys

from .errors import UserError

__all__ = ["looks_like_hub_id", "fetch_file", "read_json", "cache_only_if_hub_unreachable", "offline_errors",
           "offline_miss"]


def looks_like_hub_id(name):
    """owner/name, not a path: anything else that is not on disk is a missing folder, not a Hub repository."""
    return name.count("/") == 1 and not name.startswith(("/", ".", "~"))


def fetch_file(name_or_path, filename, required=True):
    """A file of a local folder or a Hub repository (downloaded), or None where it has none and required is False."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.exists(path) or required else None
    if not looks_like_hub_id(name_or_path):
        raise UserError(f"{name_or_path}: no such model folder (a Hub model id looks like owner/name)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(name_or_path, filename)
    except offline_errors() as e:  # before EntryNotFoundError, a base of LocalEntryNotFoundError
        raise offline_miss(name_or_path) from e
    except EntryNotFoundError:
        if not required:
            return None
        raise UserError(f"{name_or_path}: the Hub repository has no {filename}") from None
    except Exception as e:  # offline, unknown repo: all one answer for the user
        raise UserError(f"{name_or_path}: not a local folder, and the Hub did not give its {filename} "
                        f"({type(e).__name__}); check the name or the network") from e


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from e


def offline_errors():
    """huggingface_hub's errors for a file neither in the local cache nor downloadable (no network, offline mode),
    as a tuple for `except` (imported when needed: huggingface_hub is slow to import)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return LocalEntryNotFoundError, OfflineModeIsEnabled


def offline_miss(name_or_path):
    """The one line for a Hub model this machine has not cached and cannot download."""
    from huggingface_hub import constants

    return UserError(f"{name_or_path}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), and the Hub "
                     f"cannot be reached from here (no network, or HF_HUB_OFFLINE=1): download it where there is a "
                     f"network (hf download {name_or_path}) and copy the cache, or pass a local folder")


_NOTED = set()  # the sources the note was printed for


@contextlib.contextmanager
def cache_only_if_hub_unreachable(name_or_path):
    """Loads of name_or_path inside the block read the local Hugging Face cache only, where it is not a local folder
    and the Hub cannot be reached (a compute node without a network). Left alone, huggingface_hub retries each
    file's request with backoff: a cached model took 2 min 45 s to load there, a missing gpt2 26 s to fail. Only
    the block is offline, so a later push still tries the network; HF_HUB_OFFLINE=1 skips the check."""
    from huggingface_hub import constants

    if os.path.isdir(name_or_path) or constants.HF_HUB_OFFLINE or _hub_reachable():
        yield
        return
    if name_or_path not in _NOTED and int(os.environ.get("RANK", "0")) == 0:  # once, not per file or process
        _NOTED.add(name_or_path)
        print(f"note: the Hub ({constants.ENDPOINT}) cannot be reached: {name_or_path} from the local cache only "
              f"(HF_HUB_OFFLINE=1 skips this check)", file=sys.stderr)
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


@functools.cache
def _hub_reachable(timeout=3.0):
    """Whether the Hub's endpoint takes a TCP connection (once a process). Behind a proxy the proxy decides: yes."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                        "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False
