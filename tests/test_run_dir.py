"""RunDir, the owner of out_dir: its lock, its journal, its clean-up and its summary (in-process, fast)."""

import json

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
    assert sorted(run.clean_leftovers()) == [".model-tmp-123", ".tmp-ckpt-0000010"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "ckpt-0000005"]


def test_a_read_only_folder_is_refused_at_start(tmp_path, monkeypatch):
    run = RunDir(str(tmp_path / "out"))
    run.acquire()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(UserError, match="is not writable \\(No space left on device\\)"):
        run.probe_writable()
