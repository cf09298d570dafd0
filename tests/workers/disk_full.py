"""A real full disk for tests/test_faults.py, run inside `unshare -rm` (a private mount namespace, so it needs no
root): the trainer's out_dir on a small tmpfs.

  python disk_full.py journal DATA WORK   the disk fills while the trainer appends to its journal
  python disk_full.py refresh DATA WORK   checkpoints fit (they live elsewhere), the model folder's refresh does not

Prints one JSON line: each trainer's exit code and last stderr line, and what the folder held afterwards.
"""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "train_accelerate.py")
TINY = ["--config", "train_shakespeare_char_cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=5"]


def mount(path, size):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)


def trainer(data, out, *extra):
    return [sys.executable, TRAIN, *TINY, f"--data_dir={data}", f"--out_dir={out}", *extra]


def last_line(text):
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def fill(folder):
    """Writes a file until the filesystem is full; returns its path."""
    path = os.path.join(folder, "filler")
    with open(path, "wb", buffering=0) as f:  # unbuffered: nothing left to flush (and fail) at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return path


def journal(data, work):
    disk = os.path.join(work, "disk")
    mount(disk, "8m")
    out = os.path.join(disk, "out")
    # a checkpoint at 50, the next at 100: the journal needs a new page (~20 records) long before that
    args = ["--max_iters=300", "--eval_interval=50", "--always_save_checkpoint=true", "--keep_last=1"]
    proc = subprocess.Popen(trainer(data, out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.jsonl")
    while proc.poll() is None:
        if os.path.exists(log) and sum(1 for _ in open(log)) > 55:  # past the checkpoint of iteration 50
            break
        time.sleep(0.02)
    filler = fill(disk)
    _, stderr = proc.communicate(timeout=120)
    full = {"code": proc.returncode, "last": last_line(stderr), "tracebacks": stderr.count("Traceback")}
    os.remove(filler)
    again = subprocess.run(trainer(data, out, *args[1:], "--init_from=auto", "--max_iters=80"), capture_output=True,
                           text=True, timeout=300)
    records = [json.loads(line) for line in open(log)]
    steps = [r["iter"] for r in records if "train/loss" in r]
    return {"full": full, "resumed": {"code": again.returncode, "last": last_line(again.stderr or again.stdout)},
            "steps_once": steps == list(range(80))}


def refresh(data, work):
    disk = os.path.join(work, "disk")
    mount(disk, "64k")  # the journal and config fit; a copy of the weights does not
    out, elsewhere = os.path.join(disk, "out"), os.path.join(work, "checkpoints")
    os.makedirs(out)
    os.makedirs(elsewhere)
    os.symlink(elsewhere, os.path.join(out, "checkpoints"))
    first = subprocess.run(trainer(data, out, "--max_iters=4", "--eval_interval=2"), capture_output=True, text=True,
                           timeout=300)
    complete = sorted(n for n in os.listdir(elsewhere) if os.path.exists(os.path.join(elsewhere, n, "MANIFEST.json")))
    subprocess.run(["mount", "-o", "remount,size=8m", disk], check=True)  # space freed
    again = subprocess.run(trainer(data, out, "--max_iters=4", "--eval_interval=2", "--init_from=auto"),
                           capture_output=True, text=True, timeout=300)
    sys.path.insert(0, ROOT)
    from nanogpt_hf.run_dir import RunDir

    return {"full": {"code": first.returncode, "last": last_line(first.stderr), "complete": complete},
            "resumed": {"code": again.returncode, "out": again.stdout[-3000:], "current": RunDir(out).model_is_current()}}


if __name__ == "__main__":
    what, data, work = sys.argv[1:4]
    print(json.dumps({"journal": journal, "refresh": refresh}[what](data, work)))
