"""RunDir, the owner of out_dir: its lock, its journal, its clean-up and its summary (in-process, fast)."""

import json
import os

import pytest

from nanogpt_hf.errors import UserError
from nanogpt_hf.run_dir import RunDir


def test_the_lock_admits_one_owner_and_names_it(tmp_path):
    first, second = RunDir(str(tmp_path / "out")), RunDir(str(tmp_path / "out"))
    first.acquire()
    with pytest.raises(UserError, match=r"is in use by another trainer \(pid \d+ on "):
        second.acquire()
    first.release()  # closing the descriptor drops the flock, as the kernel does when a process dies
    second.acquire()
    second.release()


def test_journal_tolerates_torn_and_garbage_lines(tmp_path):
    run = RunDir(str(tmp_path))
    lines = [{"iter": 0, "val/loss": 4.0}, {"iter": 0, "train/loss": 4.1}, {"iter": 1, "train/loss": 3.9}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "\x00\x00garbage\n" + '{"iter": 2, "tr')
    warnings = []
    assert run.read_log(warnings.append) == lines
    assert len(warnings) == 2 and "line 4 is damaged" in warnings[0] and "line 5" in warnings[1]


def test_rewind_keeps_the_resume_points_evaluation(tmp_path):
    run = RunDir(str(tmp_path))
    records = [{"iter": 0, "val/loss": 4.0}] + [{"iter": i, "train/loss": 4.0 - i} for i in range(12)]
    records.insert(11, {"iter": 10, "val/loss": 2.5})
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run.rewind_log(10, print)
    kept = run.read_log()
    assert [r["iter"] for r in kept if "train/loss" in r] == list(range(10))
    assert [r["iter"] for r in kept if "val/loss" in r] == [0, 10]
    run.rewind_log(10, print)  # re-running a finished run changes nothing
    assert run.read_log() == kept
    run.rewind_log(None, print)  # a fresh start (no checkpoint): an empty journal
    assert run.read_log() == []


def test_leftovers_of_interrupted_writes_are_removed(tmp_path):
    run = RunDir(str(tmp_path))
    (tmp_path / ".model-tmp-123").mkdir()
    (tmp_path / "checkpoints" / ".tmp-ckpt-0000010").mkdir(parents=True)
    (tmp_path / "checkpoints" / "ckpt-0000005").mkdir()
    (tmp_path / ".log.jsonl.0123456789ab.tmp").write_text("{")  # fileio.atomic_path's, killed before its rename
    (tmp_path / ".train_config.yaml.ba9876543210.tmp").write_text("out_dir")
    assert sorted(run.clean_leftovers()) == [f"removed {name}, left by an interrupted write" for name in (
        ".log.jsonl.0123456789ab.tmp", ".model-tmp-123", ".tmp-ckpt-0000010", ".train_config.yaml.ba9876543210.tmp")]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "ckpt-0000005"]


def _checkpoint(folder, content):
    folder.mkdir(parents=True)
    (folder / "weights").write_text(content)
    (folder / "MANIFEST.json").write_text("{}")


@pytest.mark.parametrize("phase", ["set aside", "both in place"])
def test_replacing_a_checkpoint_of_the_same_iteration_survives_a_kill_at_any_point(tmp_path, phase):
    """A rerun from an older checkpoint saves iteration 10 again: a kill after the old copy was set aside (before the
    new one is in place) or after both renames (before the old copy is removed) leaves one whole ckpt-10, the new."""
    run = RunDir(str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    _checkpoint(ckpts / ".tmp-ckpt-0000010", "new")
    _checkpoint(ckpts / ("ckpt-0000010" if phase == "both in place" else ".old-ckpt-0000010"), "old")
    if phase == "both in place":
        os.replace(ckpts / "ckpt-0000010", ckpts / ".old-ckpt-0000010")
        os.replace(ckpts / ".tmp-ckpt-0000010", ckpts / "ckpt-0000010")
    run.clean_leftovers()
    assert sorted(os.listdir(ckpts)) == ["ckpt-0000010"]
    assert (ckpts / "ckpt-0000010" / "weights").read_text() == "new"


def test_an_interrupted_replacement_without_the_new_copy_restores_the_old(tmp_path):
    run = RunDir(str(tmp_path))
    _checkpoint(tmp_path / "checkpoints" / ".old-ckpt-0000010", "old")
    (tmp_path / "checkpoints" / ".tmp-ckpt-0000010").mkdir()  # unfinished: no manifest
    assert run.clean_leftovers() == ["removed .tmp-ckpt-0000010, left by an interrupted write",
                                     "restored ckpt-0000010, whose replacement was interrupted"]
    assert (tmp_path / "checkpoints" / "ckpt-0000010" / "weights").read_text() == "old"


def test_a_garbage_manifest_leaves_the_model_folder_alone(tmp_path):
    run = RunDir(str(tmp_path))
    (tmp_path / "checkpoints" / "ckpt-0000010").mkdir(parents=True)
    (tmp_path / "checkpoints" / "ckpt-0000010" / "MANIFEST.json").write_text("garbage{")
    assert run.model_is_current()


def test_a_read_only_folder_is_refused_at_start(tmp_path, monkeypatch):
    run = RunDir(str(tmp_path / "out"))
    run.acquire()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(UserError, match="is not writable \\(No space left on device\\)"):
        run.probe_writable()
