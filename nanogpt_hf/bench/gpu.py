"""The GPU proof: the GPU path through the trainer's own loop in one run (nanogpt-bench --what gpu)."""

import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from ..errors import UserError
from ..run_dir import RunDir
from .generate import bench_generate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout: accelerate_configs/
GPU_RUN = dict(train=["--config", "train_gpt2", "--dtype=bfloat16", "--compile=true", "--max_iters=40",
                      "--eval_interval=40", "--eval_iters=10", "--log_interval=1", "--warmup_iters=5",
                      "--gradient_accumulation_steps=1", "--batch_size=16", "--wandb_log=false"],
               fsdp=["--config", "finetune_shakespeare", "--init_from=scratch", "--n_layer=12", "--n_head=12",
                     "--n_embd=768", "--block_size=1024", "--bias=false", "--dtype=bfloat16", "--batch_size=8",
                     "--gradient_accumulation_steps=2", "--eval_interval=10", "--eval_iters=5",
                     "--always_save_checkpoint=true"],
               speedrun=["--config", "speedrun_gpt2", "--max_iters=20", "--eval_interval=20", "--eval_iters=5",
                         "--log_interval=1", "--gradient_accumulation_steps=1", "--batch_size=16", "--wandb_log=false"],
               shape="124M", fsdp_iters=(10, 20), new_tokens=256)


def _step_figures(out, skip=5):
    """(median ms/iter, tokens/s, MFU or None) of a run's journal, past its first `skip` steps (compilation)."""
    records = [r for r in RunDir(out).read_log() if "time_ms" in r][skip:]
    if not records:
        return None, None, None
    ms = statistics.median(r["time_ms"] for r in records)
    mfu = records[-1].get("mfu")
    return ms, statistics.median(r["tokens_per_s"] for r in records), mfu


GPU_STEP_TIMEOUT_S = 300  # one step of the GPU proof: a hang must not spend a lent GPU's whole budget


def _checked(cmd, cwd, env=None, timeout=GPU_STEP_TIMEOUT_S):
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise UserError(f"{' '.join(cmd[:6])} ... did not finish in {timeout} s (hung?); its last output: "
                        f"{tail.strip()[-300:] or 'none'}") from e
    if proc.returncode != 0:
        raise UserError(f"{' '.join(cmd[:6])} ... failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc


def gpu_proof(device, run=None, env=None):
    """The GPU path through the trainer's own loop, in one run: the 124M model in bf16 with torch.compile (ms/iter,
    tokens/s, MFU against the device's dense bf16 peak), its checkpoint loaded back and sampled through `pipeline`,
    accelerate_configs/fsdp.yaml on one process (train, evaluate, checkpoint, resume), a few steps of speedrun_gpt2,
    and cached generation against GPT2LMHeadModel. `run` shrinks it (tests exercise the same code on a CPU)."""
    from transformers import pipeline

    from ..prepare import prepare_shakespeare

    run = {**GPU_RUN, **(run or {})}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        with contextlib.redirect_stdout(io.StringIO()):
            prepare_shakespeare(data)  # shipped Tiny Shakespeare, GPT-2 BPE
        out = os.path.join(tmp, "train")
        t0 = time.perf_counter()
        _checked([sys.executable, "-m", "nanogpt_hf.train", *run["train"], f"--data_dir={data}", f"--out_dir={out}"],
                 tmp, env)
        ms, tps, mfu = _step_figures(out)
        rows.append(("train (compile, bf16)", f"{ms:.1f} ms/iter, {tps:,.0f} tok/s, MFU "
                     f"{'n/a' if mfu is None else f'{mfu * 100:.1f}%'}, {time.perf_counter() - t0:.0f} s in all"))
        pipe = pipeline("text-generation", model=out, device=device)
        text = pipe("ROMEO:", max_new_tokens=20, do_sample=False)[0]["generated_text"]
        rows.append(("checkpoint -> pipeline", f"loaded and sampled: {text[:40]!r}"))

        fsdp, launch = os.path.join(tmp, "fsdp"), os.path.join(ROOT, "accelerate_configs", "fsdp.yaml")
        if not os.path.isfile(launch):
            raise UserError(f"{launch} is missing: run nanogpt-bench --what gpu from a checkout of nanogpt-hf")
        first, last = run["fsdp_iters"]
        base = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch, "--num_processes", "1",
                "-m", "nanogpt_hf.train"]
        _checked([*base, *run["fsdp"], f"--max_iters={first}", f"--data_dir={data}", f"--out_dir={fsdp}"], tmp, env)
        resumed = _checked([*base, "--init_from=resume", f"--out_dir={fsdp}", f"--max_iters={last}"], tmp, env)
        ok = "Resuming training from" in resumed.stdout and "(FSDP)" in resumed.stdout
        rows.append(("fsdp.yaml, 1 process", f"trained to {first}, resumed to {last}: "
                     f"{'ok' if ok else 'NOT resumed under FSDP'}; {_step_figures(fsdp, 2)[0]:.1f} ms/iter"))

        speed = os.path.join(tmp, "speedrun")
        _checked([sys.executable, "-m", "nanogpt_hf.train", *run["speedrun"], f"--data_dir={data}",
                  f"--out_dir={speed}"], tmp, env)
        ms, tps, mfu = _step_figures(speed)
        rows.append(("speedrun_gpt2 steps", f"{ms:.1f} ms/iter, {tps:,.0f} tok/s"))
    generated = bench_generate(torch.device(device), run["shape"], new_tokens=run["new_tokens"], repeats=3)
    t = generated["tokens_per_s"]
    rows.append(("cached generation, batch 1", f"{t['generate']:.0f} tok/s vs GPT2LMHeadModel "
                 f"{t['GPT2LMHeadModel generate']:.0f} (x{generated['vs_GPT2LMHeadModel']['generate']:.2f})"))
    return {"what": "gpu", "device": str(device), "rows": rows}
