"""nanogpt-hub: push a training run to the Hugging Face Hub, and pull a run's training state back to resume it.

    python -m nanogpt_hf.hub push OUT_DIR REPO_ID [--public] [--training_state]
    python -m nanogpt_hf.hub pull REPO_ID          # prints the local folder; then --resume_from=REPO_ID trains on

The trainer pushes by itself with --push_to_hub=true. The token comes from the environment (HF_TOKEN) or
`hf auth login`, through huggingface_hub; it is never printed, logged or written to out_dir.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

from .config import TrainConfig
from .config_yaml import read_yaml
from .errors import UserError, cli_main
from .fileio import atomic_path
from .run_dir import PUSH_PREFIX, RunDir
from .sources import cache_only_if_hub_unreachable

__all__ = ["model_card", "push_run", "push_after_save", "wait_for_pushes", "download_training_state", "MODEL_FILES",
           "main"]

MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "*.py", "tokenizer*", "vocab.json",
               "merges.txt", "special_tokens_map.json", "added_tokens.json", "README.md", "train_config.yaml",
               "log.jsonl", "loss.png"]


def _eval_iteration(state):
    """Which iteration the recorded losses were measured at (a run stopped by a signal saves a later one)."""
    if not state or state.get("eval_iter") is None:
        return "n/a"
    return f"iteration {state['eval_iter']}"


def model_card(cfg, state):
    """README.md of a pushed run: what was trained, on what, how far, and the command that reproduces it."""
    tokens = f"{state['tokens_seen']:,}" if state else "unknown"
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "n/a"  # noqa: E731
    repo = cfg.hub_model_id or os.path.basename(os.path.abspath(cfg.out_dir))
    data = cfg.dataset if cfg.data_source == "memmap" else cfg.stream_dataset or ", ".join(cfg.stream_files)
    return f"""---
library_name: transformers
tags: [nanogpt, nanogpt-hf, text-generation]
pipeline_tag: text-generation
---
{CARD_START}
# {repo}

A NanoGPT ({cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, context {cfg.block_size}) trained with
nanogpt-hf (nanoGPT as a transformers model) on `{data}`.

| | |
|---|---|
| iterations | {state['iter_num'] if state else 'n/a'} |
| tokens seen | {tokens} |
| last evaluation | {_eval_iteration(state)} |
| train loss (last evaluation) | {fmt(state.get('train_loss') if state else None)} |
| val loss (last evaluation) | {fmt(state.get('val_loss') if state else None)} |

```python
from transformers import pipeline
pipe = pipeline("text-generation", model="{cfg.hub_model_id or 'THIS_REPO'}", trust_remote_code=True)
```

Reproduce (train_config.yaml is in this repository):

```bash
python train_accelerate.py --config train_config.yaml
```

## Training config

```yaml
{yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip()}
```
{CARD_END}
"""


# the part of README.md a push writes; everything outside it (nanogpt-eval's sections, a user's notes) is kept
CARD_START, CARD_END = "<!-- nanogpt-hf: model card -->", "<!-- nanogpt-hf: end of model card -->"
_EVAL_SECTION = re.compile(r"(<!-- nanogpt-eval: (.*?) -->\n.*?<!-- nanogpt-eval: \2 -->\n?)", re.S)


def _front_matter(text):
    """(the YAML front matter block, the rest) of a model card."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            return text[:end + 5], text[end + 5:]
    return "", text


def merged_card(existing, card):
    """The new card with what other tools wrote kept: its front matter replaces the old one, its block (between the
    markers) replaces ours, and the rest stays where it was. A card pushed before the markers existed keeps its
    nanogpt-eval sections."""
    if existing is None:
        return card
    front, ours = _front_matter(card)
    _, rest = _front_matter(existing)
    if CARD_START in rest and CARD_END in rest:
        before, after = rest.split(CARD_START, 1)[0], rest.split(CARD_END, 1)[1].lstrip("\n")
    elif "nanogpt-hf (nanoGPT as a transformers model)" in rest:  # our own card, written before the markers
        before, after = "", "".join(m.group(1) for m in _EVAL_SECTION.finditer(rest))
    else:  # somebody else's README: kept whole, after ours
        before, after = "", rest
    return front + before + ours.rstrip("\n") + "\n" + ("\n" + after if after.strip() else "")


def push_run(cfg, include_training_state=False, api=None, folder=None):
    """Uploads the model folder (+ model card) and optionally the latest checkpoint of folder (default: out_dir) to
    hub_model_id. Any failure (network, access) is one UserError with the whole reason."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    folder = folder or cfg.out_dir
    run = RunDir(folder)
    ckpt = run.latest_checkpoint()
    state = run.latest_state(ckpt)
    path = os.path.join(folder, "README.md")
    existing = open(path, encoding="utf-8").read() if os.path.isfile(path) else None
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(merged_card(existing, model_card(cfg, state)))
    try:
        api.create_repo(cfg.hub_model_id, private=cfg.hub_private, exist_ok=True)
        api.upload_folder(repo_id=cfg.hub_model_id, folder_path=folder, allow_patterns=MODEL_FILES,
                          ignore_patterns=["*/*"],  # top-level files only: not checkpoints/, wandb/, tensorboard logs
                          commit_message=f"nanogpt-hf: iteration {state['iter_num'] if state else 0}")
        if include_training_state and ckpt:
            api.upload_folder(repo_id=cfg.hub_model_id, folder_path=ckpt,
                              path_in_repo=f"checkpoints/{os.path.basename(ckpt)}",
                              commit_message=f"training state at iteration {state['iter_num']}")
    except Exception as e:  # offline, no token, no access: the run stays as it is
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"cannot push to {cfg.hub_model_id} ({type(e).__name__}: {reason})") from e
    return cfg.hub_model_id


def push_after_save(cfg, when, say, pushes):
    """The trainer's push after a save (hub_strategy every_save) or at the end, in a process of its own: the run goes
    on while it uploads, and with several processes no rank waits in a collective for an upload (a gpt2-xl push with
    its training state, ~19 GB, outlasts NCCL's 10-minute timeout below ~30 MB/s). What it uploads is staged first:
    out_dir's model files and newest checkpoint as they are now, hard links (a later save replaces files, never
    changes them). pushes: the trainer's list of pushes under way; one still uploading at an every_save push means
    this one is skipped (the next save's, or the end's, is newer). A failed push is one line when its result is read
    (at the next save or the end); the run is intact and the next save pushes again. The end's is waited for after
    the run's last collective (wait_for_pushes)."""
    if not cfg.push_to_hub or (when == "every_save" and cfg.hub_strategy != "every_save"):
        return
    _report_finished(pushes, cfg, say)
    if pushes and when == "every_save":
        return
    staging = _stage(cfg.out_dir)
    command = [sys.executable, "-m", "nanogpt_hf.hub", "push", staging, cfg.hub_model_id, "--staged",
               *([] if cfg.hub_private else ["--public"]), *(["--training_state"] if cfg.hub_push_training_state else [])]
    pushes.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True))


def wait_for_pushes(pushes, cfg, say):
    """Waits for the pushes under way (the run's last one), saying so; a failed one is one line."""
    for proc in pushes:
        if proc.poll() is None:
            say(f"waiting for the push to {cfg.hub_model_id} to finish")
        proc.wait()
    _report_finished(pushes, cfg, say)


def _report_finished(pushes, cfg, say):
    """Drops the finished pushes from the list; a failed one is one line."""
    for proc in [p for p in pushes if p.poll() is not None]:
        pushes.remove(proc)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.read().splitlines() if line.strip()]
            reason = next((line[len("error: "):] for line in lines if line.startswith("error: ")),
                          lines[-1] if lines else f"exit code {proc.returncode}")
            say(f"warning: push to {cfg.hub_model_id} failed ({reason}); the run is intact and the push is retried "
                f"at the next save")
        proc.stderr.close()


def _stage(out_dir):
    """A snapshot of out_dir's top-level files and newest checkpoint for a push, in out_dir/.push-* (the push removes
    it when done): the large files and the checkpoint's hard links where the filesystem has them (a save replaces
    them, never writes into them), the rest copied."""
    run = RunDir(out_dir)
    staging = tempfile.mkdtemp(prefix=PUSH_PREFIX, dir=out_dir)
    for name in os.listdir(out_dir):
        source = os.path.join(out_dir, name)
        if os.path.isfile(source) and not name.startswith("."):  # small files copied: the journal grows in place
            stage = _link_or_copy if os.path.getsize(source) > (16 << 20) else shutil.copy2
            stage(source, os.path.join(staging, name))
    ckpt = run.latest_checkpoint()
    if ckpt:
        shutil.copytree(ckpt, os.path.join(staging, "checkpoints", os.path.basename(ckpt)), copy_function=_link_or_copy)
    return staging


def _link_or_copy(source, dest):
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def download_training_state(repo_id):
    """A local folder holding checkpoints/ckpt-N of a pushed run (from the Hub, or its cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        with cache_only_if_hub_unreachable(repo_id):
            folder = snapshot_download(repo_id, allow_patterns=["checkpoints/*"])
    except Exception as e:  # offline and not cached, unknown repo, no access: one answer for the user
        raise UserError(f"resume_from={repo_id}: cannot get its training state from the Hub ({type(e).__name__}); "
                        f"check the id, your access and the network") from e
    if RunDir(folder).latest_checkpoint() is None:
        raise UserError(f"{repo_id} holds no training state: push it with hub_push_training_state=true")
    return folder


def _config_of(out_dir):
    run = RunDir(out_dir)
    if not os.path.exists(run.config_path):
        raise UserError(f"{out_dir} has no train_config.yaml: not a training run (train into it first)")
    saved = read_yaml(run.config_path)
    return TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="nanogpt-hub", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="upload a run's model folder (and its latest checkpoint)")
    push.add_argument("out_dir", help="a training run's folder")
    push.add_argument("repo_id", help="the Hub repository, e.g. your-name/my-gpt")
    push.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    push.add_argument("--training_state", action="store_true", help="also push the latest checkpoint (to resume)")
    push.add_argument("--staged", action="store_true", help=argparse.SUPPRESS)  # the trainer's: a copy, removed after
    pull = sub.add_parser("pull", help="download a pushed run's training state; prints its folder")
    pull.add_argument("repo_id")
    args = p.parse_args(argv)
    if args.command == "pull":
        print(download_training_state(args.repo_id))
        return
    cfg = _config_of(args.out_dir)
    if not args.staged:  # a staged copy (the trainer's push) keeps the run's own out_dir in its card
        cfg.out_dir = args.out_dir
    cfg.hub_model_id, cfg.hub_private = args.repo_id, not args.public
    try:
        print(f"pushed {args.out_dir} to {push_run(cfg, args.training_state, folder=args.out_dir)}")
    finally:
        if args.staged:
            shutil.rmtree(args.out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
