"""Whole runs in child processes: prepare's throughput and memory, accelerate launch to the first step, the CPU
quickstart."""

import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time

from ..errors import UserError
from ..run_dir import RunDir


def _synthetic_corpus(path, megabytes):
    """Tiny Shakespeare paragraphs, repeated and shuffled, to `megabytes` of text."""
    import random

    from ..tokenization import ASSETS

    paragraphs = open(os.path.join(ASSETS, "tinyshakespeare", "input.txt"), encoding="utf-8").read().split("\n\n")
    rng = random.Random(0)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            chunk = "\n\n".join(rng.sample(paragraphs, len(paragraphs))) + "\n\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    return written


def bench_prepare(corpus_mb=200, num_proc=2):
    """Wall time, MB/s and peak RSS of a real `nanogpt-prepare documents` run in a child process."""
    from ..corpus import tokenize_batch

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        n_bytes = _synthetic_corpus(corpus, corpus_mb)
        sample = open(corpus, encoding="utf-8").read(20_000_000).split("\n\n")
        t0 = time.perf_counter()
        tokenize_batch(sample)
        raw_mb_s = sum(len(s.encode("utf-8")) for s in sample) / 1e6 / (time.perf_counter() - t0)
        cmd = [sys.executable, "-c",
               "import resource, sys, time; from nanogpt_hf.prepare import main; t = time.perf_counter();\n"
               "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
               "print('RESULT', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
               "documents", "--files", corpus, "--out_dir", os.path.join(tmp, "out"), "--num_proc", str(num_proc)]
        env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(tmp, "cache")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
        if not line:
            raise UserError(f"the prepare run failed: {proc.stderr[-500:]}")
        seconds, max_rss_kb = float(line[0].split()[1]), int(line[0].split()[2])
    return {"what": "prepare", "corpus_mb": n_bytes / 1e6, "num_proc": num_proc, "seconds": seconds,
            "end_to_end_mb_per_s": n_bytes / 1e6 / seconds, "tokenize_mb_per_s": raw_mb_s,
            "peak_rss_mb": max_rss_kb / 1024}


def prepare_shakespeare_char_into(folder):
    from ..prepare import prepare_shakespeare_char

    with contextlib.redirect_stdout(io.StringIO()):
        prepare_shakespeare_char(os.path.join(folder, "data"))  # the copy shipped in the package
    return os.path.join(folder, "data")


def training_command(config, folder, data_dir, out, *overrides):
    """`python -m nanogpt_hf.train` of a shipped config into folder/out: everything it needs ships with the package,
    so this works outside a checkout too."""
    return [sys.executable, "-m", "nanogpt_hf.train", "--config", config, f"--out_dir={os.path.join(folder, out)}",
            f"--data_dir={data_dir}", *overrides]


def _launch_quickstart(folder, data_dir, *overrides, stderr=subprocess.PIPE):
    """`accelerate launch` (one CPU process) of the quickstart config into folder/out, as a Popen."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes=1", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no",
           *training_command("train_shakespeare_char_cpu", folder, data_dir, "out", *overrides)[1:]]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True, cwd=folder)


def bench_startup():
    """Seconds from `accelerate launch` to the first logged training step of the CPU quickstart config."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "out", "log.jsonl")
        data_dir = prepare_shakespeare_char_into(tmp)
        t0 = time.perf_counter()
        # stderr not piped: nothing reads it while the log is polled
        proc = _launch_quickstart(tmp, data_dir, "--max_iters=3", stderr=subprocess.DEVNULL)
        first = None
        while first is None and proc.poll() is None:
            if os.path.exists(log) and any('"train/loss"' in ln for ln in open(log)):
                first = time.perf_counter() - t0
            time.sleep(0.02)
        proc.communicate()
    if first is None:
        raise UserError("the quickstart start-up run failed")
    return {"what": "startup", "seconds_to_first_step": first}


def bench_quickstart(seed=None, iters=None):
    """The whole CPU quickstart run (train_shakespeare_char_cpu): median ms/iter and the val loss it reaches."""
    overrides = ([f"--seed={seed}"] if seed is not None else []) + \
        ([f"--max_iters={iters}", f"--lr_decay_iters={iters}"] if iters else [])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        data_dir = prepare_shakespeare_char_into(tmp)
        t0 = time.perf_counter()
        proc = _launch_quickstart(tmp, data_dir, *overrides)
        _, stderr = proc.communicate()
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise UserError(f"the quickstart run failed: {stderr.strip().splitlines()[-1:]}")
        records = RunDir(out).read_log()
    steps = [r["time_ms"] for r in records if "time_ms" in r]
    final = [r for r in records if "val/loss" in r][-1]
    return {"what": "quickstart", "seconds": seconds, "iters": len(steps), "median_ms_per_iter": statistics.median(steps),
            "val_loss_iter": final["iter"], "val_loss": final["val/loss"]}
