"""Resuming as operators do, and loading what someone else made: the plainest resume command on 1 and 2 processes,
a run moved to another process count, and the attacks of the resume issue (a crafted manifest, a checkpoint's
config naming other folders and a public push, code in a model folder, edited data, diverged weights, a garbage
manifest, a too-long block, a dead peer). Each through the real trainer."""

import json
import os
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TRAIN, assert_cli_error, read_log, run_cli, run_train, train_args, train_losses
from nanogpt_hf.checkpoint import write_manifest
from nanogpt_hf.config import load_config
from nanogpt_hf.errors import UserError
from nanogpt_hf.resolve import resolve_run
from nanogpt_hf.train import main as train_main

pytestmark = pytest.mark.slow  # every test here starts trainers

DDP = ["torchrun", "--standalone", "--nproc_per_node", "2"]


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tree(folder):
    return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(folder) for f in fs}


@pytest.mark.parametrize("procs, extra", [
    (1, ["--gradient_accumulation_steps=1"]),
    (1, ["--gradient_accumulation_steps=2", "--dtype=bfloat16"]),
    (2, ["--gradient_accumulation_steps=1", "--dropout=0.1"]),  # rounded up to 2 at the start: 1 micro-step each
])
def test_the_plainest_resume_continues_bit_identically(tmp_path, char_data, procs, extra):
    """`--init_from=resume --out_dir=X --max_iters=N` and nothing else, under the same launcher: the run's own
    accumulation, precision and data come back from its checkpoint (before the Accelerator is built), so the
    resumed iterations equal those of the uninterrupted run bit for bit."""
    out = tmp_path / "out"
    launcher = DDP if procs == 2 else ()
    run_train(out, char_data, "--max_iters=8", "--eval_interval=4", "--always_save_checkpoint=true", *extra,
              launcher=launcher)
    reference, ref_losses = _weights(out), train_losses(out)
    shutil.rmtree(out / "checkpoints" / "ckpt-0000008")  # back to iteration 4, as if the run had stopped there
    cmd = [*(launcher or [sys.executable]), TRAIN, "--init_from=resume", f"--out_dir={out}", "--max_iters=8"]
    resumed = run_cli(cmd)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "ckpt-0000004" in resumed.stdout and "done: trained to iteration 8" in resumed.stdout
    assert _same(_weights(out), reference) and train_losses(out) == ref_losses


@pytest.fixture(scope="module")
def run(tmp_path_factory, char_data):
    """A finished 1-process run: accumulation 2, bf16, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("run") / "out"
    run_train(out, char_data, "--max_iters=8", "--eval_interval=4", "--always_save_checkpoint=true",
              "--gradient_accumulation_steps=2", "--dtype=bfloat16", "--keep_last=2")
    return out


def _resolve(out, world, *argv):
    cfg, sources = load_config(["--init_from=resume", f"--out_dir={out}", *argv])
    return resolve_run(cfg, sources, world)


def test_a_resume_keeps_the_runs_accumulation_and_precision_on_any_process_count(run):
    cfg, ckpt, _, notes = _resolve(run, 2)
    assert (cfg.gradient_accumulation_steps, cfg.dtype) == (2, "bfloat16") and ckpt.endswith("ckpt-0000008")
    assert "the run was on 1 process(es), now 2: 1 micro-steps per process keep its 256 tokens per iteration" in notes
    with pytest.raises(UserError, match="which 4 processes cannot share: resume it on a number of processes that "
                                        "divides 2, or pass --gradient_accumulation_steps=4"):
        _resolve(run, 4)
    cfg, _, _, notes = _resolve(run, 4, "--gradient_accumulation_steps=4")  # the user's explicit change
    assert cfg.gradient_accumulation_steps == 4 and "  gradient_accumulation_steps: 2 -> 4 (from the command line)" in notes


def test_a_crafted_manifest_is_refused_before_anything_is_read(run, tmp_path, char_data, capsys):
    """A training state pulled from the Hub whose manifest names /dev/zero (hashing it would never end)."""
    out = tmp_path / "out"
    shutil.copytree(run, out)
    ckpt = out / "checkpoints" / "ckpt-0000008"
    manifest = json.load(open(ckpt / "MANIFEST.json"))
    for name in ("../../../../dev/zero", "/etc/passwd", "model/../../x"):
        files = {**manifest["files"], name: {"size": 1 << 40, "sha256": "0" * 64}}
        json.dump({"files": files}, open(ckpt / "MANIFEST.json", "w"))
        t0 = time.monotonic()
        with pytest.raises(UserError, match="not a plain path inside the checkpoint"):
            _resolve(out, 1)
        assert time.monotonic() - t0 < 1.0
    json.dump(manifest, open(ckpt / "MANIFEST.json", "w"))
    os.symlink("/dev/zero", ckpt / "zero")
    with pytest.raises(UserError, match="zero is a link or a device"):
        _resolve(out, 1)
    os.remove(ckpt / "zero")
    (ckpt / "extra.py").write_text("print('unlisted')")
    assert_cli_error(train_main, ["--init_from=resume", f"--out_dir={out}"], "extra.py is not in its manifest", capsys)


def test_a_checkpoints_config_never_redirects_the_run_or_publishes(run, tmp_path):
    """The pulled checkpoint's config names another out_dir, a public push and a hub id: the resume writes only
    its own out_dir, pushes nothing, and says what it did not take."""
    pulled, victim, mine = tmp_path / "pulled", tmp_path / "victim", tmp_path / "mine"
    shutil.copytree(run, pulled)
    victim.mkdir()
    ckpt = pulled / "checkpoints" / "ckpt-0000008"
    state = json.load(open(ckpt / "trainer_state.json"))
    state["config"].update(out_dir=str(victim), push_to_hub=True, hub_model_id="attacker/x", hub_private=False)
    json.dump(state, open(ckpt / "trainer_state.json", "w"))
    write_manifest(str(ckpt))  # consistent, as a crafted upload would be
    proc = run_cli([sys.executable, TRAIN, "--init_from=resume", f"--resume_from={ckpt}", f"--out_dir={mine}",
                    "--max_iters=10"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.listdir(victim) == [] and (mine / "checkpoints" / "ckpt-0000010").is_dir()
    assert "  push_to_hub: True -> False (this command's: a checkpoint never decides" in proc.stdout
    assert "push" not in proc.stdout.split("Resuming training from")[1].split("\n", 4)[-1]  # no push attempted
    saved = __import__("yaml").safe_load(open(mine / "train_config.yaml"))
    assert saved["out_dir"] == str(mine) and saved["push_to_hub"] is False and saved["hub_model_id"] == ""


def test_a_moved_run_writes_only_where_it_now_is(run, tmp_path):
    """Copy run A to B and resume B from a YAML naming B, with W&B: nothing is written into A."""
    a, b = tmp_path / "A", tmp_path / "B"
    shutil.copytree(run, a)
    state = json.load(open(a / "checkpoints" / "ckpt-0000008" / "trainer_state.json"))
    assert state["config"]["out_dir"] != str(b)
    shutil.copytree(a, b)
    before = _tree(a)
    (tmp_path / "b.yaml").write_text(f"out_dir: {b}\nwandb_log: true\nwandb_project: moved\n")
    proc = run_cli([sys.executable, TRAIN, "--config", str(tmp_path / "b.yaml"), "--init_from=resume",
                    "--max_iters=10"], env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _tree(a) == before and (b / "wandb").is_dir() and (b / "checkpoints" / "ckpt-0000010").is_dir()


@pytest.mark.parametrize("how", ["mv", "cp -a"])
def test_a_moved_or_copied_run_keeps_its_best_checkpoint(tmp_path, char_data, how):
    """Trained to 20 with keep_last=1 (the best is the newest), moved or copied, resumed to 30 with a worse val loss:
    the best, iteration 20, is still there, and the closing line names where it is now. A record written before
    runs were relocatable (best_checkpoint an absolute path of the old place) is read by its name the same way."""
    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "moved"
    args = ["--eval_interval=10", "--dropout=0.1", "--always_save_checkpoint=true", "--keep_last=1"]
    run_train(first, char_data, *args, "--max_iters=20")
    state_file = first / "checkpoints" / "ckpt-0000020" / "trainer_state.json"
    state = json.load(open(state_file))
    assert state["best_checkpoint"] == "ckpt-0000020"  # a name, not a path
    if how == "mv":  # the earlier format, as an older version wrote it
        json.dump({**state, "best_checkpoint": str(state_file.parent)}, open(state_file, "w"))
        write_manifest(str(state_file.parent))
    moved.parent.mkdir()
    os.rename(first, moved) if how == "mv" else shutil.copytree(first, moved, symlinks=True)
    proc = run_cli([sys.executable, TRAIN, "--init_from=resume", f"--out_dir={moved}", "--max_iters=30",
                    "--learning_rate=0.1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    evals = {r["iter"]: r["val/loss"] for r in read_log(moved) if "val/loss" in r}
    assert evals[30] > evals[20]  # the newest is not the best
    assert sorted(os.listdir(moved / "checkpoints")) == ["ckpt-0000020", "ckpt-0000030"]
    assert f"the best val loss {evals[20]:.4f} is iteration 20, kept in {moved}/checkpoints/ckpt-0000020" in proc.stdout


@pytest.mark.parametrize("key, value, message", [
    ("iter_num", "5", "iter_num is '5', not a whole number >= 0"),
    ("iter_num", -100, "iter_num is -100, not a whole number >= 0"),
    ("best_val_loss", "x", "best_val_loss is 'x', not a number"),
    ("tokenizer", 5, "tokenizer is 5, not an object"),
    ("data", [1], "data is [1], not an object"),
    ("best_checkpoint", "../../../etc", "best_checkpoint '../../../etc' names no checkpoint"),
])
def test_crafted_trainer_state_values_are_one_line(run, tmp_path, capsys, key, value, message):
    out = tmp_path / "out"
    shutil.copytree(run, out)
    ckpt = out / "checkpoints" / "ckpt-0000008"
    state = json.load(open(ckpt / "trainer_state.json"))
    json.dump({**state, key: value}, open(ckpt / "trainer_state.json", "w"))
    write_manifest(str(ckpt))  # consistent, as a crafted upload would be
    assert_cli_error(train_main, ["--init_from=resume", f"--out_dir={out}", "--max_iters=10"], message, capsys)


def _evil_folder(tmp_path):
    """A char model folder whose tokenizer_config.json names a code file of its own, which leaves a mark if run."""
    from conftest import tiny_model
    from nanogpt_hf.model_io import save_model_folder
    from nanogpt_hf.tokenization import char_tokenizer

    folder, mark = tmp_path / "evil", tmp_path / "RAN"
    chars = sorted(set(open(os.path.join(ROOT, "nanogpt_hf", "assets", "tinyshakespeare", "input.txt")).read()))
    tok = char_tokenizer(chars, model_max_length=32)
    save_model_folder(tiny_model(vocab_size=len(tok), bias=False, activation_function="gelu"), tok, str(folder))
    (folder / "evil.py").write_text(f"open({str(mark)!r}, 'w').write('ran')\n"
                                    "from transformers import PreTrainedTokenizerFast\n"
                                    "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.load(open(folder / "tokenizer_config.json"))
    config.update(auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]}, tokenizer_class="EvilTokenizer")
    json.dump(config, open(folder / "tokenizer_config.json", "w"))
    return folder, mark


def test_code_in_a_model_folder_runs_only_when_trusted(tmp_path, char_data, capsys):
    from nanogpt_hf.evaluate import main as eval_main
    from nanogpt_hf.sample import main as sample_main

    folder, mark = _evil_folder(tmp_path)
    message = "its tokenizer is custom code (evil.py), which runs only with --trust_remote_code=true"
    assert_cli_error(sample_main, ["--init_from", str(folder), "--max_new_tokens", "2", "--num_samples", "1"], message,
                     capsys)
    assert_cli_error(eval_main, ["--init_from", str(folder), "--data_dir", char_data, "--max_tokens", "100"], message,
                     capsys)
    assert_cli_error(train_main, train_args(tmp_path / "ft", char_data, f"--init_from={folder}", "--max_iters=2"),
                     message, capsys)
    assert not mark.exists() and not (tmp_path / "ft").exists()
    proc = run_cli([sys.executable, "-m", "nanogpt_hf.sample", "--init_from", str(folder), "--max_new_tokens", "2",
                    "--num_samples", "1", "--trust_remote_code"])
    assert proc.returncode == 0 and mark.exists(), proc.stderr[-2000:]  # asked for: it runs


def test_a_same_size_edit_of_the_data_is_refused(run, tmp_path, char_data, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(char_data, data)
    shutil.copytree(run, out)
    for ckpt in (out / "checkpoints").iterdir():  # the run trained on this copy of the data
        state = json.load(open(ckpt / "trainer_state.json"))
        state["config"]["data_dir"] = str(data)
        json.dump(state, open(ckpt / "trainer_state.json", "w"))
        write_manifest(str(ckpt))
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
    ((tokens + 1) % 65).astype(np.uint16).tofile(data / "train.bin")  # every token shifted, the size kept
    assert_cli_error(train_main, ["--init_from=resume", f"--out_dir={out}", "--max_iters=10"],
                     "train.bin is not the file prepare.py wrote (its content fingerprint differs", capsys)
    assert_cli_error(train_main, train_args(tmp_path / "fresh", str(data)), "--allow_data_change=true", capsys)
    shutil.copy(os.path.join(char_data, "train.bin"), data / "train.bin")
    meta = json.load(open(data / "meta.json"))
    json.dump({**meta, "source": "somewhere else"}, open(data / "meta.json", "w"))  # meta.json re-made elsewhere
    assert_cli_error(train_main, ["--init_from=resume", f"--out_dir={out}"], "changed since", capsys)
    json.dump(meta, open(data / "meta.json", "w"), indent=2, ensure_ascii=False)
    with open(data / "val.bin", "r+b") as f:  # truncated: no longer what meta.json describes
        f.truncate(os.path.getsize(data / "val.bin") - 1000)
    assert_cli_error(train_main, train_args(tmp_path / "fresh", str(data)), "but meta.json says", capsys)
    shutil.copy(os.path.join(char_data, "val.bin"), data / "val.bin")
    ((tokens + 1) % 65).astype(np.uint16).tofile(data / "train.bin")
    proc = run_cli([sys.executable, TRAIN, "--init_from=resume", f"--out_dir={out}", "--max_iters=10",
                    "--allow_data_change=true"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: the data changed since" in proc.stdout and "train_content" in proc.stdout


def test_a_diverged_state_is_never_saved_and_auto_resumes_a_good_one(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run, out)
    before = _weights(out)
    proc = run_cli([sys.executable, TRAIN, "--init_from=resume", f"--out_dir={out}", "--max_iters=16",
                    "--learning_rate=1e9", "--decay_lr=false", "--grad_clip=0"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged") and f"the last good checkpoint is {out}/checkpoints/ckpt-0000008" in last
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt-0000004", "ckpt-0000008"] and _same(_weights(out), before)
    again = run_cli([sys.executable, TRAIN, "--init_from=auto", f"--out_dir={out}", "--max_iters=12"])
    assert again.returncode == 0 and "Resuming training from" in again.stdout and "ckpt-0000008" in again.stdout


def test_a_garbage_newest_manifest_names_the_older_checkpoint_and_its_advice_works(run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(run, out)
    older = out / "checkpoints" / "ckpt-0000004"
    with open(out / "checkpoints" / "ckpt-0000008" / "optimizer.safetensors", "r+b") as f:
        f.truncate(50)  # damaged: refused, naming the older complete one
    assert_cli_error(train_main, ["--init_from=resume", f"--out_dir={out}"],
                     f"optimizer.safetensors does not match its manifest (truncated or edited); resume from another "
                     f"checkpoint; the older complete one is {older}: --resume_from={older}", capsys)
    (out / "checkpoints" / "ckpt-0000008" / "MANIFEST.json").write_text("{garbage")
    assert_cli_error(train_main, ["--init_from=resume", f"--out_dir={out}"], f"--resume_from={older}", capsys)
    proc = run_cli([sys.executable, TRAIN, "--init_from=resume", f"--out_dir={out}", f"--resume_from={older}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.load(open(out / "checkpoints" / "ckpt-0000008" / "MANIFEST.json"))["files"]  # written anew


def test_a_block_longer_than_the_val_split_is_refused_before_out_dir_is_written(tmp_path, capsys):
    from nanogpt_hf.prepare import prepare_shakespeare_char

    text = open(os.path.join(ROOT, "nanogpt_hf", "assets", "tinyshakespeare", "input.txt")).read()[:600]
    prepare_shakespeare_char(str(tmp_path / "data"), text=text, source="short")  # 60 val characters
    assert_cli_error(train_main, train_args(tmp_path / "out", str(tmp_path / "data"), "--block_size=64"),
                     "val.bin has 60 tokens, fewer than one block of 64 + 1", capsys)
    assert not (tmp_path / "out").exists()


def test_the_surviving_rank_of_a_killed_ddp_run_says_one_line(tmp_path, char_data):
    proc = run_train(tmp_path / "out", char_data, "--max_iters=30", "--eval_interval=10", launcher=DDP, check=False,
                     env={"NANOGPT_KILL_AT": "step@8", "NANOGPT_KILL_RANK": "1"})
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(ours) == 1 and "another process of this run stopped" in ours[0], proc.stderr[-3000:]
    assert "nanogpt_hf/" not in proc.stderr  # no traceback of ours; torchrun reports the killed worker itself
    assert [r["iter"] for r in read_log(tmp_path / "out") if "val/loss" in r] == [0]
