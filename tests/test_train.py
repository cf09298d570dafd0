"""train_accelerate.py through real launchers: one process, accelerate launch DDP over gloo, two 'nodes',
torchrun; checkpoints, bit-exact resume after SIGKILL, and config errors."""

import json
import os
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TRAIN, read_log, run_cli, run_train, train_args, train_losses

pytestmark = pytest.mark.slow  # every test here starts processes (trainers, launchers, CLIs)


def test_single_process_run_writes_a_usable_out_dir(tmp_path, char_data):
    """One run, 25 iterations (the last one not a multiple of eval_interval), logged every 5 to a file, asking for
    float16 on a CPU; the same with --gradient_checkpointing=true trains the same losses."""
    out = tmp_path / "out"
    args = ["--max_iters=25", "--eval_interval=10", "--log_interval=5", "--dtype=float16"]
    proc = run_train(out, char_data, *args)
    assert "world size 1" in proc.stdout and "tokens per iteration will be: 128" in proc.stdout
    assert "warning: dtype=float16 needs a GPU" in proc.stdout and "precision no" in proc.stdout
    assert "\r" not in proc.stdout  # progress as nanoGPT's plain lines in a log file, no bar redraws
    iters = [line for line in proc.stdout.splitlines() if line.startswith("iter ")]
    assert [line.split(":")[0] for line in iters] == ["iter 0", "iter 5", "iter 10", "iter 15", "iter 20"]
    assert all(", time " in line and "ms, mfu " in line for line in iters)
    assert any(line.startswith("step 10: train loss") for line in proc.stdout.splitlines())
    cfg = __import__("yaml").safe_load(open(out / "train_config.yaml"))
    assert cfg["n_embd"] == 32 and cfg["max_iters"] == 25 and cfg["dataset"] == "shakespeare_char"
    # a scratch model gets nanoGPT's exact GELU, and its saved config says so
    assert cfg["activation_function"] == "gelu" and json.load(open(out / "config.json"))["activation_function"] == "gelu"
    records = read_log(out)
    steps = [r for r in records if "train/loss" in r]
    assert [r["iter"] for r in steps] == [0, 5, 10, 15, 20]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "time_ms"} <= set(steps[-1])
    # MFU is null until measured (the first 5 steps settle the loop), then a fraction never above 1
    assert steps[0]["mfu"] is None and all(r["mfu"] is None or 0 < r["mfu"] <= 1 for r in steps)
    assert iters[0].endswith("mfu n/a")
    evals = [r for r in records if "val/loss" in r]  # the last iteration is always evaluated and saved
    assert [r["iter"] for r in evals] == [0, 10, 20, 25] and evals[-1]["val/loss"] < evals[0]["val/loss"]
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt-0000020", "ckpt-0000025"]
    done = [line for line in proc.stdout.splitlines() if line.startswith("done:")][0]
    assert f"val loss {evals[-1]['val/loss']:.4f}" in done and f"model folder {out} holds iteration 25" in done
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(out))  # out_dir is itself a model folder
    assert pipe("ROMEO:", max_new_tokens=5, do_sample=False)[0]["generated_text"].startswith("ROMEO:")
    run_train(tmp_path / "ckpt", char_data, *args, "--gradient_checkpointing=true")
    plain, recomputed = train_losses(out), train_losses(tmp_path / "ckpt")
    assert plain.keys() == recomputed.keys() and all(abs(plain[k] - recomputed[k]) < 1e-6 for k in plain)


@pytest.mark.slow
def test_ddp_timeout_is_how_long_a_collective_waits_for_a_stalled_peer(tmp_path, char_data):
    """Rank 1 stalls 20 s in its 4th step (a slow disk, a peer's long save) while rank 0 waits in the all-reduce:
    with --ddp_timeout=5 the process group's wait ends after 5 s (gloo says 5000ms) and the run stops with one line
    per rank instead of waiting torch's default (30 min on gloo, 10 on NCCL)."""
    launcher = ["accelerate", "launch", "--config_file", os.path.join(ROOT, "accelerate_configs", "cpu_ddp.yaml")]
    stall = {"NANOGPT_DELAY_AT": "step@4:20", "NANOGPT_DELAY_RANK": "1"}
    short = run_train(tmp_path / "short", char_data, "--max_iters=8", "--gradient_accumulation_steps=2",
                      "--ddp_timeout=5", launcher=launcher, env=stall, check=False)
    assert short.returncode != 0 and "Traceback" not in short.stderr, short.stderr[-3000:]
    assert "another process of this run stopped" in short.stderr or "rank 0 stopped the run" in short.stderr
    assert "Timed out waiting 5000ms" in short.stderr


def test_one_ranks_error_ends_a_ddp_run_at_once_and_is_shown(tmp_path, char_data):
    """Rank 1 raises in its 5th forward (as a CUDA out-of-memory error on one GPU does) while rank 0 waits in the
    gradient all-reduce: rank 1 leaves at once with one line naming it (no collective after the error), the
    launcher stops rank 0 and exits non-zero at once (not after the collective timeout), the error text in its
    output."""
    env = {"NANOGPT_RAISE_AT": "step@5", "NANOGPT_KILL_RANK": "1"}
    launcher = ["accelerate", "launch", "--config_file", os.path.join(ROOT, "accelerate_configs", "cpu_ddp.yaml")]
    proc = run_train(tmp_path / "out", char_data, "--max_iters=50", "--gradient_accumulation_steps=2",
                     launcher=launcher, env=env, check=False)
    # ended by rank 1's error, not by a collective timeout (rank 0 waiting ddp_timeout, 30 min by default)
    assert proc.returncode != 0 and "Timed out" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: rank 1 stopped the run")]
    assert len(lines) == 1 and "RuntimeError: injected fault at step@5" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("error: rank 1")[0]  # the worker's own output: one line, no traceback


def test_ddp_two_processes_match_one_process(tmp_path, char_data):
    common = ["--max_iters=8", "--eval_interval=4", "--gradient_accumulation_steps=2", "--dropout=0.0"]
    single = run_train(tmp_path / "single", char_data, *common)
    ddp = run_train(tmp_path / "ddp", char_data, *common,
                    launcher=["accelerate", "launch", "--config_file", os.path.join(ROOT, "accelerate_configs", "cpu_ddp.yaml")])
    assert "world size 2" in ddp.stdout and "world size 1" in single.stdout
    a, b = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)
    wa, wb = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert any((wa[k] - load_file(tmp_path / "single" / "checkpoints" / "ckpt-0000004" / "model" / "model.safetensors")[k]).abs().max() > 0 for k in wa)


def test_two_nodes_on_one_machine(tmp_path, char_data):
    import subprocess

    out = tmp_path / "out"
    procs = []
    for rank in (0, 1):
        cmd = ["accelerate", "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
               "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", "29561",
               TRAIN, *train_args(out, char_data, "--max_iters=4", "--eval_interval=2", "--gradient_accumulation_steps=2")]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert "world size 2" in outputs[0]
    assert [r["iter"] for r in read_log(out) if "val/loss" in r] == [0, 2, 4]


def test_torchrun_and_elastic_restart_after_a_worker_crash(tmp_path, char_data):
    out = tmp_path / "out"
    # rank 1 is SIGKILLed at its 7th training step (iter 6); torchrun restarts both workers, init_from=auto resumes
    proc = run_train(out, char_data, "--max_iters=10", "--eval_interval=4", "--gradient_accumulation_steps=2",
                     "--init_from=auto", "--always_save_checkpoint=true",
                     launcher=["torchrun", "--nproc_per_node", "2", "--max-restarts", "1"],
                     env={"NANOGPT_KILL_AT": "step@7", "NANOGPT_KILL_RANK": "1"})
    assert proc.stdout.count("world size 2") == 2  # the first attempt and the restart
    assert "Resuming training from" in proc.stdout and "ckpt-0000004" in proc.stdout
    reference = run_train(tmp_path / "ref", char_data, "--max_iters=10", "--eval_interval=4", "--gradient_accumulation_steps=2",
                          "--always_save_checkpoint=true", launcher=["torchrun", "--nproc_per_node", "2"])
    assert "world size 2" in reference.stdout
    assert train_losses(out) == train_losses(tmp_path / "ref")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("ref") / "out"
    run_train(out, char_data, *RESUME_ARGS)
    return out


RESUME_ARGS = ["--max_iters=16", "--eval_interval=5", "--always_save_checkpoint=true", "--dropout=0.1", "--keep_last=1"]


@pytest.mark.parametrize("kill_at, last_ckpt", [
    # while writing the checkpoint of iter 10: weights there, no manifest yet (inside a step and during an evaluation:
    # tests/test_resume.py and the fault campaign, docs/robustness.md)
    ("checkpoint@2", 5),
])
def test_sigkill_then_resume_is_bit_exact(tmp_path, char_data, reference_run, kill_at, last_ckpt):
    out = tmp_path / "out"
    killed = run_train(out, char_data, *RESUME_ARGS, env={"NANOGPT_KILL_AT": kill_at}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpts = os.listdir(out / "checkpoints")
    complete = [c for c in ckpts if os.path.exists(out / "checkpoints" / c / "MANIFEST.json")]
    assert complete == [f"ckpt-{last_ckpt:07d}"]
    if kill_at.startswith("checkpoint"):
        assert ".tmp-ckpt-0000010" in ckpts  # the half-written one, never picked
    # resume from a process seeded differently: only the restored RNG streams can make it match
    resumed = run_train(out, char_data, *RESUME_ARGS, "--init_from=resume", "--seed=4242")
    assert f"Resuming training from {out}/checkpoints/ckpt-{last_ckpt:07d}" in resumed.stdout
    assert train_losses(out) == train_losses(reference_run)  # bit for bit
    assert load_file(out / "model.safetensors").keys() == load_file(reference_run / "model.safetensors").keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(out / "model.safetensors").values(),
                                                 load_file(reference_run / "model.safetensors").values()))
    left = sorted(os.listdir(out / "checkpoints"))  # keep_last=1 plus the best; no temporaries left
    assert left[-1] == "ckpt-0000016" and not any(c.startswith(".tmp") for c in left)  # the last iteration is saved


def test_streaming_run_resumes_at_the_exact_batch(tmp_path):
    docs = tmp_path / "docs.txt"
    text = open(os.path.join(ROOT, "nanogpt_hf", "assets", "tinyshakespeare", "input.txt"), encoding="utf-8").read()
    docs.write_text(text[:200000])
    val = tmp_path / "val.txt"
    val.write_text(text[-20000:])
    args = ["--data_source=streaming", f"--stream_files={docs}", f"--stream_val_files={val}", "--max_iters=12",
            "--eval_interval=4", "--always_save_checkpoint=true", "--dropout=0.1"]
    run_train(tmp_path / "ref", "unused", *args)
    killed = run_train(tmp_path / "out", "unused", *args, env={"NANOGPT_KILL_AT": "step@7"}, check=False)
    assert killed.returncode == -9
    run_train(tmp_path / "out", "unused", *args, "--init_from=resume", "--seed=7")
    assert train_losses(tmp_path / "out") == train_losses(tmp_path / "ref")


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, char_data):
    out = tmp_path / "out"
    proc = run_train(out, char_data, "--max_iters=40", "--eval_interval=5", "--learning_rate=1e30", "--warmup_iters=0",
                     "--grad_clip=0.0", "--max_bad_steps=3", "--decay_lr=false", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "non-finite steps in a row" in proc.stderr.strip().splitlines()[-1]
    assert "step skipped" in proc.stdout
    # the journal is strict JSON (no bare NaN): a skipped step's loss and grad_norm are null, and it says skipped
    def strict(constant):
        raise ValueError(f"{constant} is not JSON")

    records = [json.loads(line, parse_constant=strict) for line in open(out / "log.jsonl")]
    skipped = [r for r in records if r.get("skipped")]
    assert skipped and all(r["train/loss"] is None or r["grad_norm"] is None for r in skipped)
    assert all(r["train/loss"] is not None and r["grad_norm"] is not None for r in records
               if "train/loss" in r and not r.get("skipped"))
    # no checkpoint with non-finite weights was ever written
    for ckpt in os.listdir(out / "checkpoints") if (out / "checkpoints").exists() else []:
        weights = load_file(out / "checkpoints" / ckpt / "model" / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_progress_in_a_terminal_is_a_bar_that_messages_never_share(tmp_path, char_data):
    """Under a pseudo-terminal: a tqdm bar, and every message on a line of its own (tqdm.write clears the bar)."""
    import pty
    import re
    import subprocess

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, TRAIN, *train_args(tmp_path / "out", char_data, "--max_iters=30",
                                                                 "--eval_interval=10")],
                            cwd=ROOT, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "training:" in screen and ("it/s" in screen or "s/it" in screen)  # the bar was drawn
    for message in ("step 10: train loss", "saving checkpoint to", "done: trained to iteration 30"):
        for line in screen.split("\n"):
            if message in line:
                before = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line.rsplit("\r", 1)[-1].split(message)[0])
                assert before.strip() == "", (message, line)  # nothing of the bar on the message's line


def test_a_mistake_every_rank_meets_is_one_line_from_the_trainer(tmp_path, char_data):
    proc = run_train(tmp_path / "out", char_data, "--dataset=nosuch", "--data_dir=", check=False,
                     launcher=["accelerate", "launch", "--config_file", os.path.join(ROOT, "accelerate_configs", "cpu_ddp.yaml")])
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert [ln for ln in output.splitlines() if ln.startswith("error: ")] == [
        "error: dataset folder data/nosuch does not exist: run its prepare.py first (python data/nosuch/prepare.py)"]
    assert "nanogpt_hf/" not in output  # no traceback from the workers
    assert "Traceback" not in output and proc.returncode == 143, output  # nor the launcher's: asked to stop, it stops


def test_a_compiled_run_writes_checkpoints_that_load_and_resume(tmp_path, char_data):
    """--compile=true (inductor on the CPU): the model folder, the checkpoints and the optimizer state carry the
    model's own parameter names (no `_orig_mod.`), load strictly, and a resume continues to the uninterrupted run's
    weights and losses within float rounding (compiled and eager kernels round differently)."""
    from nanogpt_hf.checkpoint import load_tree
    from nanogpt_hf.model_io import from_pretrained_strict

    out = tmp_path / "out"
    run_train(out, char_data, "--compile=true", "--max_iters=8", "--eval_interval=4", "--always_save_checkpoint=true")
    from_pretrained_strict(str(out))  # raises on any missing or unexpected weight
    ckpt = out / "checkpoints" / "ckpt-0000004"
    assert not [k for k in load_file(ckpt / "model" / "model.safetensors") if "_orig_mod" in k]
    assert not [k for k in load_tree(str(ckpt / "optimizer"))["state"] if "_orig_mod" in k]
    reference, losses = load_file(out / "model.safetensors"), train_losses(out)
    import shutil

    shutil.rmtree(out / "checkpoints" / "ckpt-0000008")
    # resumed without compile (one compile less to wait for): the saved names fit the plain model
    proc = run_cli([sys.executable, TRAIN, "--init_from=resume", f"--out_dir={out}", "--max_iters=8", "--compile=false"])
    assert proc.returncode == 0 and "compile False" in proc.stdout, proc.stderr[-2000:]
    resumed = load_file(out / "model.safetensors")
    assert max((resumed[k] - reference[k]).abs().max().item() for k in reference) < 1e-6
    assert train_losses(out).keys() == losses.keys()
    assert all(abs(train_losses(out)[k] - losses[k]) < 1e-5 for k in losses)


def test_a_compiled_ddp_model_prints_no_note_on_ddps_profiler_range(tmp_path):
    """torch.compile over DDP (the trainer's order, as Accelerate's) makes dynamo note, once per rank, that it skips
    DDP's profiler range: noise the trainer's _compiled filters out. A one-rank gloo group, in fresh interpreters:
    plain torch.compile prints the note (so the check can fail on this torch), the trainer's _compiled does not."""
    code = """
        import sys, torch, torch.distributed as dist
        from types import SimpleNamespace
        from nanogpt_hf.train import _compiled
        dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
        model = {compile}
        model(torch.randn(4, 8)).sum().backward()
        dist.destroy_process_group()
        print("stepped")
    """
    procs = {name: run_cli([sys.executable, "-c", textwrap.dedent(code.format(compile=call)), str(tmp_path / name)])
             for name, call in (("plain", "torch.compile(ddp)"),
                                ("ours", "_compiled(ddp, SimpleNamespace(compile=True), print)"))}
    assert all(p.returncode == 0 and "stepped" in p.stdout for p in procs.values()), procs
    assert "Profiler record function" in procs["plain"].stderr
    assert "Profiler record function" not in procs["ours"].stderr, procs["ours"].stderr


def test_a_compile_failure_stops_with_one_line(tmp_path, char_data):
    """No working C++ compiler for inductor: the run stops at its first forward with the error's name, instead of
    training eagerly without a word (torch._dynamo's suppress_errors)."""
    proc = run_train(tmp_path / "out", char_data, "--compile=true", "--max_iters=4", check=False,
                     env={"CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: torch.compile failed (InductorError") and "--compile=false" in last


def test_the_prepared_model_returns_the_loss_in_fp32_without_an_fp32_copy_of_the_logits():
    """Under mixed precision Accelerate wraps forward to cast every output to fp32 (a full copy of the logits per
    micro-step); the trainer's prepare() removes that wrapper: under autocast the logits stay bf16, the loss is fp32."""
    proc = run_cli([sys.executable, "-c", """
import sys, torch
sys.path.insert(0, 'tests')
from accelerate import Accelerator
from conftest import tiny_model
from nanogpt_hf.train import prepare
accelerator = Accelerator(cpu=True, mixed_precision="bf16")
model = tiny_model().train()
plain, _ = accelerator.prepare(tiny_model().train(), torch.optim.AdamW(tiny_model().parameters()))
model, _, raw = prepare(accelerator, model, [torch.optim.AdamW(model.parameters())])
x = torch.randint(0, 96, (2, 16))
with accelerator.autocast():
    ours, accelerates = model(x, shift_labels=x), plain(x, shift_labels=x)
print(ours.logits.dtype, ours.loss.dtype, accelerates.logits.dtype)
"""])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["torch.bfloat16", "torch.float32", "torch.float32"]
