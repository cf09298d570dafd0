"""Every bad input of the reliability issue through the real CLIs: one `error:` line, exit 2, nothing
overwritten. And safe loading: no pickle is ever executed."""

import os
import pickle
import shutil
import sys

import pytest
import torch
from conftest import TRAIN, assert_cli_error, assert_one_line_error, run_cli, train_args
from transformers import GPT2Config, GPT2LMHeadModel

from nanogpt_hf.sample import main as sample_main
from nanogpt_hf.train import main as train_main

pytestmark = pytest.mark.slow  # every test here starts processes (trainers, launchers, CLIs)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny random GPT-2 (the real 50257 vocabulary) saved as a plain transformers folder."""
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("run") / "out"
    assert train_main(train_args(out, char_data, "--max_iters=4", "--eval_interval=2", "--always_save_checkpoint=true"))
    return out


class Evil:
    """Unpickling this runs code: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _snapshot(folder):
    return {os.path.join(r, f): os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs}


def test_trainer_bad_input_table(tmp_path, char_data, bpe_data, gpt2_folder, finished_run, capsys):
    empty_bins = tmp_path / "empty_bins"
    shutil.copytree(char_data, empty_bins)
    open(empty_bins / "train.bin", "wb").close()
    damaged = tmp_path / "damaged"
    shutil.copytree(finished_run, damaged)
    latest = sorted(os.listdir(damaged / "checkpoints"))[-1]
    with open(damaged / "checkpoints" / latest / "optimizer.safetensors", "r+b") as f:
        f.truncate(100)
    corrupt = tmp_path / "corrupt_model"
    shutil.copytree(gpt2_folder, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    cases = [
        (["--dataset=no_such_dataset"], "does not exist: run its prepare.py"),
        (train_args(tmp_path / "o1", empty_bins), "holds 0 tokens but meta.json says"),
        (train_args(tmp_path / "o2", bpe_data, f"--init_from={gpt2_folder}", "--block_size=64"),
         "block_size=64 is larger than"),
        (train_args(tmp_path / "o3", char_data, f"--init_from={gpt2_folder}"),
         "uses GPT-2 BPE (50257 tokens) but the data was prepared with a 65-character vocabulary"),
        (train_args(tmp_path / "o4", char_data, "--init_from=resume"), "no complete checkpoint"),
        (train_args(damaged, char_data, "--init_from=resume"), "optimizer.safetensors does not match its manifest"),
        (train_args(tmp_path / "o5", bpe_data, f"--init_from={corrupt}"), "cannot load the model"),
        (train_args(finished_run, char_data), "already holds checkpoints of a run"),
        (train_args(finished_run, char_data, "--init_from=resume", "--n_layer=3"),
         "was trained with n_layer=2 but the command line says 3"),
        (train_args(finished_run, char_data, "--init_from=resume", "--activation_function=gelu_new"),
         "was trained with activation_function='gelu' but the command line says 'gelu_new'"),
        (train_args(tmp_path / "o8", char_data, "--activation_function=relu"), "activation_function must be one of"),
        (train_args(finished_run, bpe_data, "--init_from=resume"),
         "uses a 65-character vocabulary but the data was prepared with GPT-2 BPE"),
        (train_args(tmp_path / "o6", char_data, "--dtype=float8"), "dtype must be one of"),
    ]
    before = _snapshot(finished_run)
    for argv, message in cases:
        assert_cli_error(train_main, argv, message, capsys)
    assert _snapshot(finished_run) == before  # nothing of the existing run was touched
    # and once through a real process: exit code 2, no traceback
    assert_one_line_error(run_cli([sys.executable, TRAIN, *train_args(tmp_path / "o7", char_data, "--init_from=resume")]),
                          "no complete checkpoint")


def test_pickle_where_weights_belong_is_refused_without_running_it(tmp_path, gpt2_folder, bpe_data, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil_gpt2"
    shutil.copytree(gpt2_folder, evil)
    os.remove(evil / "model.safetensors")
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": Evil(str(marker))}, f)
    assert_cli_error(train_main, train_args(tmp_path / "o", bpe_data, f"--init_from={evil}"), "cannot load the model", capsys)
    assert_cli_error(sample_main, ["--init_from", str(evil)], "cannot load the model", capsys)
    assert not marker.exists()  # the payload never ran


def test_crafted_pickle_in_a_checkpoint_is_never_loaded(tmp_path, finished_run, char_data, capsys):
    """A checkpoint folder whose files were swapped for a pickle: the manifest refuses it, and nothing unpickles."""
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    latest = sorted(os.listdir(run / "checkpoints"))[-1]
    with open(run / "checkpoints" / latest / "optimizer.safetensors", "wb") as f:
        pickle.dump(Evil(str(marker)), f)
    assert_cli_error(train_main, train_args(run, char_data, "--init_from=resume"), "does not match its manifest", capsys)
    assert not marker.exists()


def test_sample_cli_errors(tmp_path, finished_run, capsys):
    cases = [
        (["--out_dir", str(tmp_path / "missing")], "no model in"),
        (["--out_dir", str(finished_run), "--temperature", "0"], "--temperature must be > 0"),
        (["--out_dir", str(finished_run), "--temperature", "-1"], "--temperature must be > 0"),
        (["--out_dir", str(finished_run), "--top_k", "1000"], "--top_k must be between 0 (off) and the vocabulary size 67"),
        (["--out_dir", str(finished_run), "--start", "x" * 40], "the prompt is 40 tokens but the model's context is 32"),
        (["--out_dir", str(finished_run), "--start", "caf\u00e9 \u2603"], "not in this model's vocabulary"),
        (["--out_dir", str(finished_run), "--start", f"FILE:{tmp_path / 'nope.txt'}"], "cannot read the prompt file"),
        (["--out_dir", str(finished_run), "--device", "cuda"], "no CUDA GPU is visible"),
    ]
    for argv, message in cases:
        assert_cli_error(sample_main, argv, message, capsys)
