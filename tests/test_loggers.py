"""Loggers for real: W&B in offline mode (its binary run file read back here), TensorBoard event files, trackio's
local database (read back through trackio), and the JSONL log they are compared with; a resumed run continues the
same W&B and trackio runs."""

import glob
import json
import math
import os
import struct

import pytest

from conftest import TRAIN, read_log, run_cli, train_args

pytestmark = pytest.mark.slow  # every test here starts processes (trainers, launchers, CLIs)


def read_wandb_records(path):
    """Records of a W&B run file: a 7-byte header (':W&B', magic, version), then LevelDB-log framing (32 KiB blocks,
    7-byte record headers: crc32c, length, type FULL/FIRST/MIDDLE/LAST) around wandb_internal_pb2.Record protos."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    return [Record.FromString(b) for b in out]


def wandb_history(run_file):
    rows = {}
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            rows.setdefault(items.get("_step"), {}).update(items)
    return rows


def test_wandb_offline_and_tensorboard_log_what_the_jsonl_log_has(tmp_path, char_data):
    out = tmp_path / "out"
    args = train_args(out, char_data, "--max_iters=8", "--eval_interval=4", "--wandb_log=true",
                      "--loggers=tensorboard,trackio", "--wandb_project=nanogpt-test", "--wandb_run_name=offline-check",
                      "--always_save_checkpoint=true")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio")}
    proc = run_cli(["python", TRAIN, *args], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # in a log (not a terminal) trackio's lines come without colour codes, its closing line once
    assert "\x1b[" not in proc.stdout and proc.stdout.count("* Run finished") == 1, proc.stdout[-3000:]
    jsonl = read_log(out)
    run_files = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1
    history = wandb_history(run_files[0])
    for record in jsonl:  # every value of the JSONL log is in W&B at the same step; a null (MFU before it is known) not
        logged = history[record["iter"]]
        for key, value in record.items():
            if key != "iter":
                assert (key not in logged) if value is None else logged[key] == pytest.approx(value, rel=1e-6), \
                    (record["iter"], key)
    assert history[4]["val/perplexity"] == pytest.approx(math.exp(history[4]["val/loss"]))
    config = [r.config for r in read_wandb_records(run_files[0]) if r.WhichOneof("record_type") == "config"]
    keys = {item.key: json.loads(item.value_json) for c in config for item in c.update}
    assert keys["n_layer"] == 2 and keys["wandb_run_name"] == "offline-check"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_files = glob.glob(str(out / "nanogpt-test" / "events.out.tfevents.*"))
    acc = EventAccumulator(tb_files[0])
    acc.Reload()
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_loss == pytest.approx({r["iter"]: r["train/loss"] for r in jsonl if "train/loss" in r}, rel=1e-6)

    # resuming continues the SAME W&B run (its id is stored in the checkpoint), instead of starting a new one
    resumed = run_cli(["python", TRAIN, *args, "--init_from=resume", "--max_iters=10"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_ids = sorted(os.path.basename(p).split("-")[-1] for p in glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(run_ids) == 2 and run_ids[0] == run_ids[1]
    state = json.load(open(sorted(glob.glob(str(out / "checkpoints" / "ckpt-*" / "trainer_state.json")))[-1]))
    assert state["tracker_ids"]["wandb"] == run_ids[0]

    # trackio: one run in the local project, holding every step and evaluation of both legs, read through trackio
    proc = run_cli(["python", "-c", "import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
                    "print(json.dumps({r: S.get_logs('nanogpt-test', r) for r in S.get_runs('nanogpt-test')}))"],
                   env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(runs) == [state["tracker_ids"]["trackio"]] and list(runs)[0].startswith("offline-check-")
    logged = {}
    for row in runs[list(runs)[0]]:
        logged.setdefault(row["step"], {}).update(row)
    for record in read_log(out):  # both legs: iterations 0..9 and the evaluations at 0, 4, 8, 10
        for key, value in record.items():
            if key != "iter" and value is not None:
                assert logged[record["iter"]][key] == pytest.approx(value, rel=1e-6), (record["iter"], key)
    assert max(logged) == 10 and "val/loss" in logged[10]


def test_wandb_without_an_api_key_is_one_line_before_any_training(tmp_path, char_data):
    out = tmp_path / "out"
    proc = run_cli(["python", TRAIN, *train_args(out, char_data, "--max_iters=3", "--wandb_log=true")],
                   env={"WANDB_MODE": "online", "WANDB_API_KEY": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: W&B could not start (UsageError")
    assert not (out / "log.jsonl").exists() and not os.listdir(out / "checkpoints")  # nothing trained or saved
