"""nanogpt-serve OUT_DIR: the run's model as an OpenAI-compatible endpoint (/v1/completions, streaming too), served
by transformers' own server (`transformers serve`: its app, model process and streaming), its completion handler
extended by the OpenAI fields clients send (serve_app.py), and decoded by this package's model.

transformers' server builds a model from a class inside transformers when the config names an architecture
(`getattr(transformers, "NanoGPTForCausalLM")` fails), and from 5.25 on loads a config that names none through
AutoModelForCausalLM, which runs the model code saved beside the weights under trust_remote_code. So the model is
written once to a served folder: this package's model code (save_pretrained copies it), a config naming no
architecture, and a tokenizer of transformers' own classes (char or GPT-2 BPE), kept in a cache keyed by every
file that defines the model (config, generation config, weights, tokenizer) and the code. The server is pinned to
that folder (it refuses requests for any other model; the run's folder name is an alias of it), so the code it
trusts is this package's. Decoding takes the model's fast path (docs/serving.md), and every model option serves
(rotary positions, RMSNorm, ...). A base model has no chat template: use /v1/completions (chat completions answer
400). This process is the server: SIGTERM and Ctrl-C stop it.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import time
import urllib.request

from .errors import UserError, cli_main
from .model_io import load_model_and_tokenizer, save_model_folder
from .tokenization import portable_tokenizer

__all__ = ["main", "served_folder", "cache_root", "free_port", "wait_until_serving"]

# transformers serve loads a config without `architectures` through AutoModelForCausalLM from 5.25 on (5.24 looks
# up config.architectures[0] inside transformers whatever the config says)
MIN_TRANSFORMERS = (5, 25)


def cache_root():
    """$NANOGPT_HF_CACHE, else $XDG_CACHE_HOME/nanogpt-hf, else ~/.cache/nanogpt-hf."""
    return os.environ.get("NANOGPT_HF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nanogpt-hf")


def _model_code_files():
    """The files save_pretrained copies beside the weights: the modeling module and its relative imports."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from . import modeling_nanogpt

    return [modeling_nanogpt.__file__, *sorted(get_relative_import_files(modeling_nanogpt.__file__))]


# what a model folder holds that defines the model it serves: config, generation config, weights, tokenizer files
_MODEL_FILE = re.compile(r"(config|generation_config|special_tokens_map|added_tokens)\.json|model.*\.safetensors(\.index\.json)?"
                         r"|tokenizer.*|vocab.*|merges\.txt|chat_template.*|.*\.py")


def _digest(folder):
    """sha256 of every file that defines the folder's model (their names and bytes) and of the model code a served
    folder carries: a change to any of them (an edited config.json, another tokenizer) is a new served folder."""
    missing = [name for name in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UserError(f"{folder}: not a complete model folder (no {' and no '.join(missing)}): serve a training "
                        f"run's out_dir or a folder save_pretrained wrote")
    files = sorted(name for name in os.listdir(folder)
                   if _MODEL_FILE.fullmatch(name) and os.path.isfile(os.path.join(folder, name)))
    h = hashlib.sha256()
    for name, path in [*((name, os.path.join(folder, name)) for name in files),
                       *(("code:" + os.path.basename(path), path) for path in _model_code_files())]:
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:20]


def served_folder(source):
    """The folder transformers' server loads source's model from, written once per version of weights and code."""
    if not os.path.isdir(source):
        raise UserError(f"{source}: no such folder (nanogpt-serve takes a training run's out_dir or a model folder)")
    folder = os.path.join(cache_root(), "serve", _digest(source))
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_served_folder(source, tmp)
        os.replace(tmp, folder)  # complete, or not there: another server may be writing the same one
    except OSError:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_served_folder(source, dest):
    model, tokenizer = load_model_and_tokenizer(source)
    save_model_folder(model, portable_tokenizer(tokenizer, model.config.block_size), dest)
    # no architecture named: the server then loads AutoModelForCausalLM, which follows the config's auto_map to the
    # code saved here, instead of looking NanoGPTForCausalLM up inside transformers
    path = os.path.join(dest, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.pop("architectures", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _check_serving_installed(transformers_version=None):
    missing = [m for m in ("fastapi", "uvicorn") if not _importable(m)]
    if missing:
        raise UserError(f"serving needs {', '.join(missing)}: pip install 'nanogpt-hf[serving]' (transformers[serving])")
    from packaging.version import Version

    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    if Version(transformers_version).release < MIN_TRANSFORMERS:
        raise UserError(f"nanogpt-serve needs transformers>=5.25, whose server runs a model's own code (this is "
                        f"{transformers_version}): pip install -U 'nanogpt-hf[serving]'")


def _importable(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def free_port():
    """A TCP port free on 127.0.0.1 now, for a server started next (the bench's, the tests')."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bound_socket(host, port):
    """host:port bound and listened on as uvicorn does it (SO_REUSEADDR), before the model loads, and handed to the
    server: one line when another server is there, and no second nanogpt-serve can take the port meanwhile (a
    client that connects early waits for the server instead of being refused)."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen()  # listening: another bind fails at once (two bound, not listening, sockets may share it)
    except OSError as e:
        s.close()
        raise UserError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}; another server may be "
                        f"there): stop it or choose another --port") from e
    return s


def wait_until_serving(port, process, timeout=180):
    """Returns once the server on 127.0.0.1:port answers /health; RuntimeError if its process ends first or the
    timeout passes (a model loads in seconds to minutes)."""
    deadline = time.time() + timeout
    while True:
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the server on port {port} did not start")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)


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
    listening = _bound_socket(args.host, args.port)  # before the model loads, which takes seconds to minutes
    try:
        folder = served_folder(args.out_dir)
    except BaseException:
        listening.close()  # nothing to serve: the port is free again at once
        raise
    run_name = os.path.basename(os.path.abspath(args.out_dir))
    names = sorted({run_name, args.out_dir, os.path.abspath(args.out_dir)})
    print(f"serving {args.out_dir} ({folder}) at http://{args.host}:{args.port}/v1: POST /v1/completions with "
          f"\"model\": {run_name!r} (or {folder!r}) (a base model: no chat template)", flush=True)
    from .serve_app import NanoGPTServe

    # pinned to the folder: trust_remote_code runs its code (this package's), and the server loads no other model;
    # this process is the server, so SIGTERM and Ctrl-C reach it directly
    NanoGPTServe(folder, names, listening, host=args.host, port=args.port, device=args.device)


if __name__ == "__main__":
    main()
