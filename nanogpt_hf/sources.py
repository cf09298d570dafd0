"""Where model files come from: a local folder or a Hub repository (downloaded, or the offline cache). Shared by
model_io.py (configs and weights) and tokenization.py (tokenizer files), which import it and not each other."""

import json
import os

from .errors import UserError

__all__ = ["looks_like_hub_id", "fetch_file", "read_json"]


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
