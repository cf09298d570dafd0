"""The speedrun race: nanoGPT's own train.py (or our classic recipe) against the speedrun config, to the same
val loss."""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from ..errors import UserError
from .common import NANOGPT_CPU_FLAGS
from .runs import prepare_shakespeare_char_into, training_command

EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
ITER_LINE = re.compile(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms")  # nanoGPT's line, and ours outside a terminal


def _run_timed(cmd, cwd):
    """Runs a training command; returns (seconds from process start to exit, [(seconds, iter, val estimate)] for
    each evaluation line as it appeared on stdout: how the run's loss fell over wall time, [ms of each iteration
    as the run logged it])."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    curve, step_ms = [], []

    def read_stdout():
        for line in proc.stdout:
            m = EVAL_LINE.search(line)
            if m:
                curve.append((time.perf_counter() - t0, int(m.group(1)), float(m.group(3))))
            m = ITER_LINE.search(line)
            if m and int(m.group(1)) > 0:  # iteration 0 includes the first evaluation's time in nanoGPT's log
                step_ms.append(float(m.group(2)))

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    tail = proc.stderr.read().strip().splitlines()[-1:]
    proc.wait()
    seconds = time.perf_counter() - t0
    reader.join()
    if proc.returncode != 0:
        raise UserError(f"{' '.join(cmd[:4])} ... failed: {tail}")
    return seconds, curve, step_ms


def _full_val_loss(model, data_dir):
    """The loss of a full pass over val.bin, every token predicted once (nanogpt-eval's scoring)."""
    import numpy as np

    from ..evaluate import evaluate_tokens

    tokens = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    return evaluate_tokens(model.eval(), tokens, model.config.block_size, batch_size=64)["loss"]


def _nanogpt_checkpoint_model(path):
    """nanoGPT's out_dir/ckpt.pt as our model: the same parameter names; its GELU is the exact one. Loaded with
    weights_only=True (tensors and plain values only: nothing in the file can run code)."""
    from ..configuration_nanogpt import NanoGPTConfig
    from ..modeling_nanogpt import NanoGPTForCausalLM

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    args = ckpt["model_args"]
    model = NanoGPTForCausalLM(NanoGPTConfig(activation_function="gelu", **{k: args[k] for k in (
        "n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")}))
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state, strict=False)  # lm_head.weight is tied to wte in both
    return model


def _nanogpt_data(folder, data_dir):
    """nanoGPT's data/shakespeare_char layout under folder, from our prepared folder: the same bins, and the meta.pkl
    nanoGPT's train.py reads its vocabulary size from (written for it; nothing here reads a pickle)."""
    import pickle

    target = os.path.join(folder, "data", "shakespeare_char")
    os.makedirs(target, exist_ok=True)
    for name in ("train.bin", "val.bin"):
        os.link(os.path.join(data_dir, name), os.path.join(target, name))
    meta = json.load(open(os.path.join(data_dir, "meta.json"), encoding="utf-8"))
    itos = {int(i): ch for i, ch in meta["itos"].items()}
    with open(os.path.join(target, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": meta["vocab_size"], "itos": itos, "stoi": {ch: i for i, ch in itos.items()}}, f)


def _classic_run(folder, data_dir, nanogpt_dir, extra=()):
    """nanoGPT's CPU command: its own train.py from a checkout, else our classic recipe with nanoGPT's settings
    (train_shakespeare_char_cpu with learning_rate 1e-3, min_lr 1e-4: nanoGPT's command exactly)."""
    if nanogpt_dir:
        if not os.path.isfile(os.path.join(nanogpt_dir, "train.py")):
            raise UserError(f"--nanogpt_dir: {nanogpt_dir}/train.py does not exist; point it at a clone of karpathy/nanoGPT")
        _nanogpt_data(folder, data_dir)
        # its train.py execs ./configurator.py (its command-line parser) from the working directory
        os.symlink(os.path.join(os.path.abspath(nanogpt_dir), "configurator.py"), os.path.join(folder, "configurator.py"))
        out = os.path.join(folder, "nanogpt-out")
        cmd = [sys.executable, os.path.join(nanogpt_dir, "train.py"),
               os.path.join(nanogpt_dir, "config", "train_shakespeare_char.py"), *NANOGPT_CPU_FLAGS, f"--out_dir={out}"]
        seconds, curve, step_ms = _run_timed(cmd, folder)  # it reads data/shakespeare_char under its working directory
        return "nanoGPT train.py", seconds, curve, step_ms, _nanogpt_checkpoint_model(os.path.join(out, "ckpt.pt"))
    from ..modeling_nanogpt import NanoGPTForCausalLM

    seconds, curve, step_ms = _run_timed(training_command("train_shakespeare_char_cpu", folder, data_dir, "classic",
                                                           "--learning_rate=1e-3", "--min_lr=1e-4", *extra), folder)
    return "classic recipe (nanoGPT's settings)", seconds, curve, step_ms, NanoGPTForCausalLM.from_pretrained(
        os.path.join(folder, "classic"))


def bench_speedrun(nanogpt_dir=None, config="speedrun_shakespeare_char_cpu", extra=()):
    """nanoGPT's documented CPU command and the speedrun config, one after the other in this run, each timed from
    process start to the finished model and scored by a full pass over the val split. The target is the classic
    run's loss; the speedrun's time counts only if it reaches it. extra: overrides for both of our runs (tests
    shrink them)."""
    from ..modeling_nanogpt import NanoGPTForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepare_shakespeare_char_into(tmp)
        name, classic_s, classic_curve, classic_ms, classic_model = _classic_run(tmp, data_dir, nanogpt_dir, extra)
        target = _full_val_loss(classic_model, data_dir)
        speed_s, speed_curve, speed_ms = _run_timed(training_command(config, tmp, data_dir, "speedrun", *extra), tmp)
        speed_model = NanoGPTForCausalLM.from_pretrained(os.path.join(tmp, "speedrun"))
        speed_loss = _full_val_loss(speed_model, data_dir)
        startup = [ln for ln in open(os.path.join(tmp, "speedrun", "train_config.yaml")) if "muon_ns_dtype" in ln]
    # the classic run at the speedrun's wall time: its last evaluation by then (its own val estimate)
    at_equal_time = [(t, it, loss) for t, it, loss in classic_curve if t <= speed_s]
    median = lambda ms: statistics.median(ms) if ms else None  # noqa: E731
    return {"what": "speedrun", "classic": name, "config": config, "target_val_loss": target,
            "classic_seconds": classic_s, "classic_params": classic_model.num_parameters(),
            "classic_ms_per_iter": median(classic_ms), "classic_iters": classic_curve[-1][1] if classic_curve else None,
            "speedrun_seconds": speed_s, "speedrun_val_loss": speed_loss, "speedrun_params": speed_model.num_parameters(),
            "speedrun_ms_per_iter": median(speed_ms), "speedrun_iters": speed_curve[-1][1] if speed_curve else None,
            "muon_ns_dtype": startup[0].split(":")[1].strip() if startup else None,
            "reached": speed_loss <= target, "time_ratio": speed_s / classic_s,
            "classic_at_equal_time": at_equal_time[-1] if at_equal_time else None}
