"""The run folder under the faults real runs meet, through real trainer processes: preemption (SIGTERM, SIGINT),
a killed launcher, a second trainer on the same out_dir, re-runs, crashes at every phase of a save, a torn
journal. Each resumed run is compared bit for bit with an uninterrupted one."""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import (
    ROOT,
    TRAIN,
    alive,
    read_log,
    run_train,
    same_weights,
    start_train,
    train_args,
    train_losses,
    wait_for_iter,
)
from nanogpt_hf.run_dir import RunDir

pytestmark = pytest.mark.slow

LONG = ["--max_iters=300", "--eval_interval=100", "--always_save_checkpoint=true", "--dropout=0.1", "--keep_last=1",
        "--log_interval=1"]


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("long") / "out"
    run_train(out, char_data, *LONG)
    return out


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143)])  # SIGINT (130): the fault campaign, docs/robustness.md
def test_preemption_checkpoints_the_current_step_and_resumes_bit_exact(tmp_path, char_data, long_reference, sig, code):
    out = tmp_path / "out"
    proc = start_train(out, char_data, *LONG)
    wait_for_iter(out, 130, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    stopped = [line for line in stdout.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1, stdout[-2000:]
    iteration = int(stopped[0].split("at iteration ")[1].split(":")[0])
    assert iteration > 130 and f"ckpt-{iteration:07d}" in os.listdir(out / "checkpoints")
    # the saved val loss is iteration 100's (eval_interval 100): every summary says so, never "iteration {stop}'s"
    val_100 = next(r["val/loss"] for r in read_log(out) if r.get("iter") == 100 and "val/loss" in r)
    summary = RunDir(str(out)).summary()
    assert f"holds iteration {iteration} (val loss {val_100:.4f}, measured at iteration 100)" in summary, summary
    resumed = run_train(out, char_data, *LONG, "--init_from=auto")
    assert f"Resuming training from {out}/checkpoints/ckpt-{iteration:07d}" in resumed.stdout
    assert train_losses(out) == train_losses(long_reference)  # bit for bit, no record lost or doubled
    assert [r["iter"] for r in read_log(out) if "train/loss" in r] == list(range(300))
    assert same_weights(out, long_reference)


def test_a_killed_launcher_takes_its_worker_with_it(tmp_path, char_data):
    out = tmp_path / "out"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                os.path.join(ROOT, "accelerate_configs", "cpu.yaml")]
    proc = start_train(out, char_data, *LONG, launcher=launcher)
    wait_for_iter(out, 120, proc)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher alone, as an OOM killer or a scheduler might
    proc.communicate(timeout=60)
    # the worker notices (SIGTERM from the kernel), checkpoints and leaves
    assert not alive(out, 60), "the worker outlived its launcher"
    steps = [r["iter"] for r in read_log(out) if "train/loss" in r]
    newest = max(int(c.split("-")[1]) for c in os.listdir(out / "checkpoints") if c.startswith("ckpt-"))
    assert newest == steps[-1] + 1 and newest > 120  # the step it was on was saved


def test_a_second_trainer_on_the_same_out_dir_is_refused(tmp_path, char_data):
    """The first trainer holds out_dir's lock while a second starts on it. The first waits in step 40 until the
    second has been refused, so it is still running when the second checks the lock however fast this machine
    trains (its ~280 remaining steps took 8.5 s here, the second's start 5.8 s)."""
    out, go = tmp_path / "out", tmp_path / "second-refused"
    first = start_train(out, char_data, *LONG, env={"NANOGPT_DELAY_AT": f"step@40:{go}"})
    wait_for_iter(out, 38, first)
    try:
        second = subprocess.run([sys.executable, TRAIN, *train_args(out, char_data, *LONG, "--init_from=auto",
                                                                     "--learning_rate=2e-3")],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        go.touch()  # the first goes on
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"error: out_dir {out} is in use by another trainer (pid {first.pid}" in second.stderr
    assert second.stdout.strip() == ""  # refused before anything else is said ("Initializing a new model...")
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert json.loads(json.dumps(__import__("yaml").safe_load(open(out / "train_config.yaml"))))["learning_rate"] == 3e-3
    # the lock died with its holder: a new run on the folder starts (and, finished, changes nothing)
    before = {name: _digest(out / name) for name in ("log.jsonl", "model.safetensors", "train_config.yaml")}
    again = run_train(out, char_data, *LONG, "--init_from=auto")
    assert "done: trained to iteration 300" in again.stdout
    assert before == {name: _digest(out / name) for name in before}


def test_a_run_shorter_than_eval_interval_leaves_a_model_and_a_true_summary(tmp_path, char_data):
    out = tmp_path / "out"
    proc = run_train(out, char_data, "--max_iters=7", "--eval_interval=250")
    evals = [r for r in read_log(out) if "val/loss" in r]
    assert [r["iter"] for r in evals] == [0, 7]
    assert f"model folder {out} holds iteration 7 (val loss {evals[-1]['val/loss']:.4f})" in proc.stdout
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.n_layer == 2


def test_crash_before_the_first_checkpoint_then_auto_gives_one_record_per_step(tmp_path, char_data):
    out = tmp_path / "out"
    args = ["--max_iters=12", "--eval_interval=10"]
    killed = run_train(out, char_data, *args, env={"NANOGPT_KILL_AT": "step@6"}, check=False)
    assert killed.returncode == -9 and [r["iter"] for r in read_log(out) if "train/loss" in r] == [0, 1, 2, 3, 4]
    run_train(out, char_data, *args, "--init_from=auto")
    iters = [r["iter"] for r in read_log(out) if "train/loss" in r]
    assert iters == list(range(12))
    assert [r["iter"] for r in read_log(out) if "val/loss" in r] == [0, 10, 12]


def test_resume_keeps_the_checkpoints_eval_and_drops_a_torn_line(tmp_path, char_data):
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--max_iters=20", "--eval_interval=10", "--always_save_checkpoint=true", "--dropout=0.1"]
    run_train(ref, char_data, *args)
    killed = run_train(out, char_data, *args, env={"NANOGPT_KILL_AT": "step@14"}, check=False)
    assert killed.returncode == -9
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 13, "train/lo')  # a torn last line: power loss mid-write
    resumed = run_train(out, char_data, *args, "--init_from=resume")
    assert "is damaged (torn write?): dropped" in resumed.stdout
    assert train_losses(out) == train_losses(ref)
    assert [r["iter"] for r in read_log(out) if "val/loss" in r] == [0, 10, 20]  # the resume point's eval kept


def test_crash_between_a_checkpoint_and_the_model_refresh_is_repaired(tmp_path, char_data):
    out = tmp_path / "out"
    args = ["--max_iters=20", "--eval_interval=10", "--always_save_checkpoint=true"]
    killed = run_train(out, char_data, *args, env={"NANOGPT_KILL_AT": "publish@2"}, check=False)
    assert killed.returncode == -9
    newest = out / "checkpoints" / "ckpt-0000020"
    assert newest.exists() and not same_weights(out, newest / "model")  # out_dir still holds iteration 10
    (out / ".model-tmp-999").mkdir()  # what an ENOSPC during a refresh leaves
    again = run_train(out, char_data, *args, "--init_from=auto")
    assert "restored from it" in again.stdout and "removed .model-tmp-999" in again.stdout
    assert same_weights(out, newest / "model") and not (out / ".model-tmp-999").exists()


def test_checkpoint_files_are_readable_like_the_rest_of_the_folder(tmp_path, char_data):
    out = tmp_path / "out"
    run_train(out, char_data, "--max_iters=2", "--eval_interval=2")
    modes = {os.stat(os.path.join(r, f)).st_mode & 0o777 for r, _, fs in os.walk(out) for f in fs if f != ".lock"}
    assert modes == {0o666 & ~_umask()}, modes


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_model_folder_whose_config_no_longer_matches_its_weights_is_refused(tmp_path, char_data, capsys):
    from conftest import assert_cli_error
    from nanogpt_hf.evaluate import main as eval_main
    from nanogpt_hf.export import main as export_main
    from nanogpt_hf.sample import main as sample_main

    out = tmp_path / "out"
    run_train(out, char_data, "--max_iters=2", "--eval_interval=2")
    config = json.load(open(out / "config.json"))
    json.dump({**config, "n_layer": 3}, open(out / "config.json", "w"))
    message = "its weights do not match its config.json (missing: transformer.h.2"
    assert_cli_error(sample_main, ["--out_dir", str(out), "--max_new_tokens", "3"], message, capsys)
    assert_cli_error(eval_main, ["--init_from", str(out), "--data_dir", char_data, "--max_tokens", "100"], message, capsys)
    assert_cli_error(export_main, [str(out), str(tmp_path / "x")], message, capsys)


@pytest.mark.parametrize("what", ["journal", "refresh"])
def test_a_full_disk_is_one_line_and_the_run_continues_once_space_is_freed(tmp_path, char_data, what):
    """A real full disk (a small tmpfs in a private mount namespace: tests/workers/disk_full.py). journal: it fills
    while the trainer appends to log.jsonl; refresh: the checkpoint is written (elsewhere) but the model folder's copy
    does not fit. Each is one `error:` line, exit 2, no traceback; after space is freed init_from=auto continues."""
    worker = os.path.join(ROOT, "tests", "workers", "disk_full.py")
    proc = subprocess.run(["unshare", "-rm", sys.executable, worker, what, char_data, str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    full, resumed = result["full"], result["resumed"]
    assert full["code"] == 2 and resumed["code"] == 0
    if what == "journal":
        assert full["last"].startswith("error: cannot write the journal") and "No space left on device" in full["last"]
        assert full["tracebacks"] == 0 and result["steps_once"]
    else:
        assert full["complete"] == ["ckpt-0000002"]
        assert full["last"] == (f"error: checkpoint {tmp_path}/disk/out/checkpoints/ckpt-0000002 is complete, but the "
                                f"model folder {tmp_path}/disk/out could not be refreshed from it (No space left on "
                                f"device): free disk space, then continue with init_from=auto (the model folder is "
                                f"restored from the checkpoint at start)")
        assert "restored from it" in resumed["out"] and resumed["current"]
