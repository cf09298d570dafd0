"""Push a training run to the Hugging Face Hub, and pull a run's training state back to resume it elsewhere.

The token comes from the environment (HF_TOKEN) or `hf auth login`, through huggingface_hub; it is never
printed, logged or written to out_dir.
"""

import json
import os

import yaml

from .checkpoint import latest_checkpoint
from .config import public_config
from .errors import UserError
from .plot import read_log

__all__ = ["model_card", "push_run", "download_training_state", "MODEL_FILES"]

MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "*.py", "tokenizer*", "vocab.json",
               "merges.txt", "special_tokens_map.json", "added_tokens.json", "README.md", "train_config.yaml",
               "log.jsonl", "loss.png"]


def _run_state(out_dir):
    ckpt = latest_checkpoint(os.path.join(out_dir, "checkpoints"))
    if ckpt is None:
        return None, None
    with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
        return ckpt, json.load(f)


def _last_losses(out_dir):
    if not os.path.exists(os.path.join(out_dir, "log.jsonl")):
        return None, None
    evals = [r for r in read_log(out_dir) if "val/loss" in r]
    return (evals[-1]["train/loss_eval"], evals[-1]["val/loss"]) if evals else (None, None)


def model_card(cfg, state, train_loss=None, val_loss=None):
    """README.md of a pushed run: what was trained, on what, how far, and the command that reproduces it."""
    tokens = f"{state['tokens_seen']:,}" if state else "unknown"
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "n/a"  # noqa: E731
    return f"""---
library_name: transformers
tags: [nanogpt, nanogpt-hf, text-generation]
pipeline_tag: text-generation
---

# {cfg.get('hub_model_id') or os.path.basename(os.path.abspath(cfg['out_dir']))}

A NanoGPT ({cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide, context {cfg['block_size']}) trained
with [nanogpt-hf](https://github.com/) on `{cfg['dataset'] if cfg['data_source'] == 'memmap' else cfg['stream_dataset'] or cfg['stream_files']}`.

| | |
|---|---|
| iterations | {state['iter_num'] if state else 'n/a'} |
| tokens seen | {tokens} |
| final train loss | {fmt(train_loss)} |
| final val loss | {fmt(val_loss)} |

```python
from transformers import pipeline
pipe = pipeline("text-generation", model="{cfg.get('hub_model_id') or 'THIS_REPO'}", trust_remote_code=True)
```

Reproduce (train_config.yaml is in this repository):

```bash
accelerate launch train_accelerate.py --config train_config.yaml
```

## Training config

```yaml
{yaml.safe_dump(public_config(cfg), sort_keys=False).strip()}
```
"""


def push_run(cfg, include_training_state=False, api=None):
    """Uploads out_dir's model folder (+ model card) and optionally the latest checkpoint to hub_model_id."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    out_dir, repo_id = cfg["out_dir"], cfg["hub_model_id"]
    ckpt, state = _run_state(out_dir)
    train_loss, val_loss = _last_losses(out_dir)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(cfg, state, train_loss, val_loss))
    api.create_repo(repo_id, private=cfg["hub_private"], exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=out_dir, allow_patterns=MODEL_FILES,
                      ignore_patterns=["*/*"],  # top-level files only: not checkpoints/, wandb/, tensorboard logs
                      commit_message=f"nanogpt-hf: iteration {state['iter_num'] if state else 0}")
    if include_training_state and ckpt:
        api.upload_folder(repo_id=repo_id, folder_path=ckpt, path_in_repo=f"checkpoints/{os.path.basename(ckpt)}",
                          commit_message=f"training state at iteration {state['iter_num']}")
    return repo_id


def download_training_state(repo_id):
    """A local folder holding checkpoints/ckpt-N of a pushed run (from the Hub, or its cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=["checkpoints/*"])
    except Exception as e:  # offline and not cached, unknown repo, no access: one answer for the user
        raise UserError(f"resume_from={repo_id}: cannot get its training state from the Hub ({type(e).__name__}); "
                        f"check the id, your access and the network") from e
    if latest_checkpoint(os.path.join(folder, "checkpoints")) is None:
        raise UserError(f"{repo_id} holds no training state: push it with hub_push_training_state=true")
    return folder
