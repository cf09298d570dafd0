"""nanogpt-serve OUT_DIR: the run's model as an OpenAI-compatible endpoint (/v1/completions, streaming too), served
by transformers' own server (`transformers serve`), not one of ours.

transformers' server builds models from classes inside transformers, so a nanogpt-hf folder (remote code) cannot
be served as it is: the model is exported once to a plain GPT2LMHeadModel folder (nanogpt-export), kept in a cache
keyed by the sha256 of its weights, and served from there with its tokenizer (char or GPT-2 BPE). A model with
options GPT-2 cannot compute (rotary positions, RMSNorm, ...) is refused in one line. A base model has no chat
template: use /v1/completions (chat completions answer 400). SIGTERM stops the server (this process becomes it).
"""

import argparse
import hashlib
import os
import shutil
import sys

from .errors import UserError, cli_main
from .export import export_gpt2

__all__ = ["main", "served_folder", "cache_root"]


def cache_root():
    """$NANOGPT_HF_CACHE, else $XDG_CACHE_HOME/nanogpt-hf, else ~/.cache/nanogpt-hf."""
    return os.environ.get("NANOGPT_HF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nanogpt-hf")


def _weights_digest(folder):
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no model.safetensors here: serve a training run's out_dir or a model folder")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:20]


def served_folder(source):
    """The GPT2LMHeadModel folder of source's model, exported once per version of its weights."""
    if not os.path.isdir(source):
        raise UserError(f"{source}: no such folder (nanogpt-serve takes a training run's out_dir or a model folder)")
    folder = os.path.join(cache_root(), "serve", _weights_digest(source))
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_gpt2(source, tmp)
        os.replace(tmp, folder)  # complete, or not there: another server may be exporting the same weights
    except OSError:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check_serving_installed():
    missing = [m for m in ("fastapi", "uvicorn") if not _importable(m)]
    if missing:
        raise UserError(f"serving needs {', '.join(missing)}: pip install 'nanogpt-hf[serving]' (transformers[serving])")


def _importable(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="nanogpt-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="a training run's out_dir, or a model folder")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: a port is 1-65535")
    _check_serving_installed()
    folder = served_folder(args.out_dir)
    print(f"serving {args.out_dir} as GPT2LMHeadModel ({folder}) at http://{args.host}:{args.port}/v1: POST "
          f"/v1/completions with \"model\": {folder!r} (a base model: no chat template)", flush=True)
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", folder, "--host", args.host,
           "--port", str(args.port), "--device", args.device]
    os.execv(sys.executable, cmd)  # this process becomes the server: SIGTERM and Ctrl-C reach it directly


if __name__ == "__main__":
    main()
