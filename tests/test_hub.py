"""Hub push and pull, and export. The Hub's servers cannot be reached here: the pull path runs the real
huggingface_hub code offline against a populated cache in the Hub's layout; the push path runs our code against
a minimal stand-in for HfApi that lands files with huggingface_hub's own pattern filter."""

import glob
import json
import os
import shutil

import pytest
import torch
from conftest import run_cli
from huggingface_hub.utils import filter_repo_objects
from test_train import TRAIN, char_data, read_log, train_args, train_losses  # noqa: F401 - session fixture
from transformers import AutoModelForCausalLM

from nanogpt_hf import NanoGPTForCausalLM
from nanogpt_hf.export import main as export_main
from nanogpt_hf.hub import push_run
from nanogpt_hf.train import main as train_main


class LocalHub:
    """create_repo / upload_folder of HfApi, landing files in a folder per repo (the thinnest possible fake)."""

    def __init__(self, root):
        self.root = root

    def create_repo(self, repo_id, private=True, exist_ok=False):
        os.makedirs(os.path.join(self.root, repo_id), exist_ok=exist_ok)
        self.private = private

    def upload_folder(self, repo_id, folder_path, path_in_repo="", allow_patterns=None, ignore_patterns=None,
                      commit_message=""):
        files = [os.path.relpath(os.path.join(r, f), folder_path) for r, _, fs in os.walk(folder_path) for f in fs]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            dest = os.path.join(self.root, repo_id, path_in_repo, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy(os.path.join(folder_path, rel), dest)


@pytest.fixture(scope="module")
def run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("hubrun") / "out"
    train_main(train_args(out, char_data, "--max_iters=6", "--eval_interval=3", "--always_save_checkpoint=true"))
    return out


def test_push_uploads_a_loadable_model_folder_with_a_model_card(run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtoken123")
    cfg = dict(__import__("yaml").safe_load(open(run / "train_config.yaml")), hub_model_id="me/baby-gpt",
               hub_private=True, out_dir=str(run))
    hub = LocalHub(str(tmp_path / "hub"))
    push_run(cfg, include_training_state=True, api=hub)
    repo = tmp_path / "hub" / "me" / "baby-gpt"
    files = set(os.listdir(repo))
    assert {"config.json", "model.safetensors", "modeling_nanogpt.py", "configuration_nanogpt.py", "vocab.json",
            "tokenizer_config.json", "generation_config.json", "README.md", "train_config.yaml"} <= files
    assert os.listdir(repo / "checkpoints") == ["ckpt-0000006"]  # the training state, for resume elsewhere
    card = open(repo / "README.md").read()
    val = [r for r in read_log(run) if "val/loss" in r][-1]["val/loss"]
    assert f"{val:.4f}" in card and "tokens seen | 768" in card and "--config train_config.yaml" in card
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
    assert model.config.n_layer == 2
    for path in glob.glob(str(run / "**"), recursive=True):  # the token is never written anywhere
        if os.path.isfile(path):
            assert b"hf_SECRETtoken123" not in open(path, "rb").read(), path


def test_resume_from_a_hub_id_through_the_offline_cache(run, tmp_path, char_data):
    cache = tmp_path / "hub_cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--me--baby-gpt" / "snapshots" / commit
    shutil.copytree(run / "checkpoints", snapshot / "checkpoints")
    (cache / "models--me--baby-gpt" / "refs").mkdir()
    (cache / "models--me--baby-gpt" / "refs" / "main").write_text(commit)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    elsewhere = tmp_path / "elsewhere"
    proc = run_cli(["python", TRAIN, *train_args(elsewhere, char_data, "--init_from=resume", "--resume_from=me/baby-gpt",
                                                   "--max_iters=8", "--eval_interval=3")], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming training from" in proc.stdout and "ckpt-0000006" in proc.stdout
    local = tmp_path / "local"
    shutil.copytree(run, local)
    proc = run_cli(["python", TRAIN, *train_args(local, char_data, "--init_from=resume", "--max_iters=8", "--eval_interval=3")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = train_losses(elsewhere)
    assert ours and ours == {k: v for k, v in train_losses(local).items() if k >= 6}
    missing = run_cli(["python", TRAIN, *train_args(tmp_path / "x", char_data, "--init_from=resume",
                                                     "--resume_from=me/not-there")], env=env)
    assert missing.returncode == 2 and "cannot get its training state" in missing.stderr.splitlines()[-1]


def test_export_writes_a_plain_gpt2_folder(run, tmp_path, capsys):
    dest = tmp_path / "gpt2"
    export_main([str(run), str(dest)])
    plain = AutoModelForCausalLM.from_pretrained(dest)  # no trust_remote_code: a vanilla GPT-2 folder
    assert type(plain).__name__ == "GPT2LMHeadModel"
    ours = NanoGPTForCausalLM.from_pretrained(run).eval()
    x = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x).logits, ours(x).logits, atol=1e-5)
    with pytest.raises(SystemExit):
        export_main([str(run), str(dest)])  # never overwrites
    assert "is not empty" in capsys.readouterr().err
