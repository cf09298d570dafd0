"""The command-line tools' first minutes: help texts, and mistakes caught before a model is loaded."""

import time

import pytest

from conftest import assert_cli_error
from nanogpt_hf.config import TrainConfig
from nanogpt_hf.evaluate import main as eval_main
from nanogpt_hf.hub import main as hub_main
from nanogpt_hf.run_dir import RunDir


def test_eval_help_shows_the_whole_description(capsys):
    with pytest.raises(SystemExit) as exc:
        eval_main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "Windows: the token stream is cut" in out and "--multiple_choice" in out


def test_hub_has_a_command_line(capsys):
    with pytest.raises(SystemExit) as exc:
        hub_main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "push" in out and "pull" in out
    with pytest.raises(SystemExit) as exc:
        hub_main(["push", "--help"])
    assert exc.value.code == 0 and "--training_state" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["out", "./out", "/no/such/folder", "a/b/c"])
def test_a_path_like_model_name_that_is_not_there_fails_at_once(name, tmp_path, capsys, monkeypatch):
    """Refused as a missing folder without asking the Hub (whose retries took minutes offline): no download call."""
    import huggingface_hub
    import huggingface_hub.file_download

    monkeypatch.chdir(tmp_path)
    asked = []
    for module, function in ((huggingface_hub, "hf_hub_download"), (huggingface_hub.file_download, "hf_hub_download"),
                             (huggingface_hub, "snapshot_download")):
        monkeypatch.setattr(module, function, lambda *a, **k: asked.append(a))
    assert_cli_error(eval_main, ["--init_from", name, "--text_file", __file__], "no such model folder", capsys)
    assert asked == []  # not tried as a Hub id


@pytest.mark.parametrize("argv, message", [
    (["--multiple_choice", "missing.jsonl"], "missing.jsonl does not exist"),
    (["--text_file", "missing.txt"], "--text_file missing.txt does not exist"),
    (["--dataset", "no_such_dataset"], "does not exist: run its prepare.py"),
    (["--hf_dataset", "missing.jsonl"], "--hf_dataset missing.jsonl: no such file"),
    (["--text_file", __file__, "--output", "/missing/dir/x.json"], "/missing/dir is not a folder; create it first"),
    (["--text_file", __file__, "--batch_size", "0"], "--batch_size must be at least 1"),
])
def test_eval_inputs_are_checked_before_the_model_loads(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # gpt2-xl is never downloaded: the input error comes first (offline, a download would be another error)
    assert_cli_error(eval_main, ["--init_from", "gpt2-xl", *argv], message, capsys)


def test_a_failed_push_is_the_whole_reason_in_one_line(tmp_path, capsys, monkeypatch):
    from conftest import tiny_model
    from nanogpt_hf.model_io import save_model_folder
    from nanogpt_hf.tokenization import gpt2_hf_tokenizer

    out = tmp_path / "run"
    save_model_folder(tiny_model(vocab_size=50304), gpt2_hf_tokenizer(32), str(out))
    RunDir(str(out)).write_config(TrainConfig(out_dir=str(out)).to_dict())
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert_cli_error(hub_main, ["push", str(out), "me/x"], "cannot push to me/x (", capsys)


def test_a_hung_gpu_proof_step_is_stopped_with_one_line(tmp_path):
    """Every subprocess of nanogpt-bench --what gpu has a time limit: a hang costs minutes, not a GPU's budget."""
    import sys

    from nanogpt_hf.bench.gpu import _checked
    from nanogpt_hf.errors import UserError

    with pytest.raises(UserError, match=r"did not finish in 1 s \(hung\?\); its last output: waiting"):
        _checked([sys.executable, "-c", "import sys, time; print('waiting', file=sys.stderr, flush=True); "
                                        "time.sleep(30)"], str(tmp_path), timeout=1)


def test_a_refusal_waits_until_the_launcher_has_read_its_line(tmp_path, monkeypatch):
    """accelerate 1.16's one-process launcher relays its worker's stderr through a pipe; a worker that says `error:`
    and at once asks the launcher to stop lost the line whenever the signal fell between the launcher's read and its
    write (11 of 12 launches of a worker that signals right after writing; once in a suite run). Before signalling,
    errors._stop_quietly waits until the pipe is read empty (and a moment for the write); on a file, not at all."""
    import os
    import threading

    from nanogpt_hf.errors import _wait_until_relayed

    r, w = os.pipe()
    os.write(w, b"error: the line\n")
    read_at = []
    reader = threading.Timer(0.5, lambda: (os.read(r, 64), read_at.append(time.monotonic())))
    reader.start()
    _wait_until_relayed(w)
    returned_at = time.monotonic()
    reader.join()
    assert read_at and returned_at >= read_at[0] + 0.1  # after the read, with the moment for the write
    with open(tmp_path / "log", "w") as f:  # stderr a file (older launchers pass it through): nothing to wait for
        slept = []
        monkeypatch.setattr(time, "sleep", slept.append)
        _wait_until_relayed(f.fileno())
        monkeypatch.undo()
        assert slept == []
    os.close(r), os.close(w)
