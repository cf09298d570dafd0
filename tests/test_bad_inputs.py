"""Every bad input of the reliability issue through the real CLIs: one `error:` line, exit 2, nothing
overwritten. And safe loading: no pickle is ever executed."""

import os
import pickle
import shutil
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import TRAIN, assert_cli_error, assert_one_line_error, run_cli, train_args
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


def test_folders_and_values_users_receive_are_one_line(tmp_path, char_data, finished_run, capsys):
    """The held-out attack's cases: a config.json of 1e9 layers (refused within seconds, before building), a JSON
    list for a config, an alias bomb in a YAML list key and on the command line, a list key of non-strings, a
    malformed JSON line in --stream_files, an empty val.bin and an unwritable --output for nanogpt-eval (before the
    evaluation), an unwritable export destination, and a resume's shape checked against the run's own n_head."""
    import json

    from nanogpt_hf.evaluate import main as eval_main
    from nanogpt_hf.export import main as export_main

    huge = tmp_path / "huge"
    shutil.copytree(finished_run, huge)
    config = json.load(open(huge / "config.json"))
    json.dump({**config, "n_layer": 1_000_000_000}, open(huge / "config.json", "w"))
    refused = "its config.json describes a model of 1.27e+13 parameters"
    # refused from the config alone: building 1.27e13 parameters would end this process (out of memory), not refuse
    assert_cli_error(sample_main, ["--out_dir", str(huge), "--max_new_tokens", "3"], refused, capsys)
    assert_cli_error(eval_main, ["--init_from", str(huge), "--data_dir", char_data], refused, capsys)
    assert_cli_error(train_main, train_args(tmp_path / "ft", char_data, f"--init_from={huge}"), refused, capsys)
    listed = tmp_path / "listed"
    shutil.copytree(finished_run, listed)
    (listed / "config.json").write_text("[1, 2]")
    assert_cli_error(sample_main, ["--out_dir", str(listed)], "config.json: holds a JSON list, not a model config", capsys)

    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdef", "bcdefg")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nstream_files: [" + ", ".join(["*g"] * 9) + "]\n")
    aliases = "anchors and aliases (& and *) are not allowed in a config"
    # refused by the anchor check, before anything is expanded (9^7 strings otherwise)
    assert_cli_error(train_main, ["--config", str(bomb), f"--out_dir={tmp_path / 'b'}"], aliases, capsys)
    assert_cli_error(train_main, ["--stream_files=&a [1,*a]", f"--out_dir={tmp_path / 'b'}"], aliases, capsys)
    assert_cli_error(train_main, ["--stream_files=[1,[2]]", f"--out_dir={tmp_path / 'b'}"],
                     "stream_files must be a list of strings", capsys)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "hello"}\n{bad json\n')
    assert_cli_error(train_main, train_args(tmp_path / "s", char_data, "--data_source=streaming",
                                            f"--stream_files={bad_jsonl}", f"--stream_val_files={bad_jsonl}"),
                     f"{bad_jsonl}: a record cannot be read (ArrowInvalid: JSON parse error", capsys)
    for text, kind in (("5", "int 5"), ('["a", "b"]', "list ['a', 'b']"), ("null", "NoneType None")):
        wrong = tmp_path / f"wrong-{kind.split()[0]}.jsonl"  # valid JSON whose text is not text
        wrong.write_text(f'{{"text": {text}}}\n')
        assert_cli_error(train_main, train_args(tmp_path / "w", char_data, "--data_source=streaming",
                                                f"--stream_files={wrong}", f"--stream_val_files={wrong}"),
                         f"{wrong}: a record cannot be read (ValueError: its 'text' is {kind}, not text)", capsys)

    empty_val = tmp_path / "empty_val"
    shutil.copytree(char_data, empty_val)
    open(empty_val / "val.bin", "wb").close()
    assert_cli_error(eval_main, ["--init_from", str(finished_run), "--data_dir", str(empty_val)], "val.bin is empty",
                     capsys)
    assert_cli_error(eval_main, ["--init_from", str(finished_run), "--data_dir", char_data, "--output",
                                 "/proc/x.json"], "--output /proc/x.json: nothing can be written in /proc", capsys)
    assert_cli_error(eval_main, ["--init_from", str(finished_run), "--data_dir", char_data, "--output", str(tmp_path)],
                     f"--output {tmp_path} is a folder: name a file in it", capsys)  # before the evaluation
    assert_cli_error(export_main, [str(finished_run), "/proc/nope"], "DEST /proc/nope: nothing can be written", capsys)
    assert_cli_error(train_main, ["--init_from=resume", f"--out_dir={finished_run}", "--n_embd=63"],
                     "n_embd (63) must be divisible by n_head (2)", capsys)


def test_a_failed_checkpoint_write_says_what_to_do_about_its_cause():
    import errno

    from nanogpt_hf.checkpoint import _remedy

    assert _remedy(OSError(errno.ENOSPC, "No space left on device")).startswith("free disk space")
    assert _remedy(OSError(errno.EROFS, "Read-only file system")).startswith("fix out_dir's permissions")
    assert _remedy(OSError(errno.EIO, "Input/output error")) == "fix what the error names"
    assert "disk space" not in _remedy(OSError(errno.EACCES, "Permission denied"))
