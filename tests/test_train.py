"""train_accelerate.py through real launchers: one process, accelerate launch DDP over gloo, two 'nodes',
torchrun; checkpoints, bit-exact resume after SIGKILL, and config errors."""

import json
import os
import sys

import pytest
import torch
from conftest import ROOT, TRAIN, assert_cli_error, read_log, run_cli, run_train, train_args, train_losses
from safetensors.torch import load_file

from nanogpt_hf.train import get_lr
from nanogpt_hf.train import main as train_main


def test_lr_schedule_is_nanogpts():
    cfg = dict(decay_lr=True, learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=100)
    assert get_lr(0, cfg) == pytest.approx(1e-3 / 11)
    assert get_lr(10, cfg) == pytest.approx(1e-3)
    assert get_lr(55, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert get_lr(100, cfg) == pytest.approx(1e-4) and get_lr(1000, cfg) == 1e-4
    assert get_lr(3, {**cfg, "decay_lr": False}) == 1e-3


def test_single_process_run_writes_a_usable_out_dir(tmp_path, char_data):
    out = tmp_path / "out"
    proc = run_train(out, char_data, "--max_iters=20", "--eval_interval=10")
    assert "world size 1" in proc.stdout and "tokens per iteration will be: 128" in proc.stdout
    assert "val loss" in proc.stdout and "training" in proc.stdout  # progress bar
    cfg = __import__("yaml").safe_load(open(out / "train_config.yaml"))
    assert cfg["n_embd"] == 32 and cfg["max_iters"] == 20 and cfg["dataset"] == "shakespeare_char"
    # a scratch model gets nanoGPT's exact GELU, and its saved config says so
    assert cfg["activation_function"] == "gelu" and json.load(open(out / "config.json"))["activation_function"] == "gelu"
    records = read_log(out)
    steps = [r for r in records if "train/loss" in r]
    assert [r["iter"] for r in steps] == list(range(20))
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "time_ms"} <= set(steps[-1])
    evals = [r for r in records if "val/loss" in r]
    assert [r["iter"] for r in evals] == [0, 10, 20] and evals[-1]["val/loss"] < evals[0]["val/loss"]
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt-0000010", "ckpt-0000020"]
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(out))  # out_dir is itself a model folder
    assert pipe("ROMEO:", max_new_tokens=5, do_sample=False)[0]["generated_text"].startswith("ROMEO:")


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
    ("step@8", 5),  # inside a training step
    ("eval@6", 5),  # during the val half of the evaluation at iter 10 (each eval passes the point twice)
    ("checkpoint@2", 5),  # while writing the checkpoint of iter 10: weights there, no manifest yet
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
    assert left[-1] == "ckpt-0000015" and not any(c.startswith(".tmp") for c in left)


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
    # no checkpoint with non-finite weights was ever written
    for ckpt in os.listdir(out / "checkpoints") if (out / "checkpoints").exists() else []:
        weights = load_file(out / "checkpoints" / ckpt / "model" / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_config_errors_are_one_line(tmp_path, char_data, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("n_layer: 4\n  n_head: [oops\n")
    cases = [
        (["--learning_rat=1e-3"], "unknown key 'learning_rat'; did you mean 'learning_rate'?"),
        (["--batch_size=twelve"], "batch_size must be int"),
        (["--dropout=yes"], "dropout must be float"),
        (["--config", "no_such_config"], "config 'no_such_config' not found"),
        (["--config", str(bad_yaml)], "malformed YAML at line 2"),
        (["--n_layer=0"], "n_layer must be positive"),
        (["--n_embd=100", "--n_head=3"], "n_embd (100) must be divisible by n_head (3)"),
        (["--dtype=float8"], "dtype must be one of"),
        (["--max_iters"], "--max_iters needs a value"),
    ]
    for argv, message in cases:
        assert_cli_error(train_main, argv, message, capsys)


def test_seed_style_config_path_and_name(tmp_path, char_data):
    proc = run_cli([sys.executable, TRAIN, f"--config-path={ROOT}/configs", "--config-name=train_shakespeare_char_cpu",
                    "--n_layer=1", "--n_head=1", "--n_embd=16", "--block_size=16", "--batch_size=2", "--eval_iters=1",
                    "--max_iters=2", "--eval_interval=1", f"--data_dir={char_data}", f"--out_dir={tmp_path / 'o'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world size 1" in proc.stdout


def test_unsupported_precision_falls_back_with_a_warning(tmp_path, char_data):
    proc = run_train(tmp_path / "out", char_data, "--max_iters=2", "--eval_interval=2", "--dtype=float16")
    assert "warning: dtype=float16 needs a GPU" in proc.stdout and "precision no" in proc.stdout
    assert [r["iter"] for r in read_log(tmp_path / "out") if "val/loss" in r] == [0, 2]


def test_cpu_allocator_setting_stops_per_step_page_faults():
    """The trainer's glibc setting (hardware.keep_freed_memory_mapped): a 64 MB block allocated and freed 20 times,
    as a training step does with an embedding gradient, is not page-faulted in afresh each time. Measured in
    fresh processes, with and without the setting."""
    code = (
        "import resource, sys, torch\n"
        "from nanogpt_hf.hardware import keep_freed_memory_mapped\n"
        "if sys.argv[1] == 'tuned':\n"
        "    assert keep_freed_memory_mapped()\n"
        "for _ in range(3):  # the heap settles over the first few blocks\n"
        "    torch.empty(16 << 20).fill_(1.0)\n"
        "faults = []\n"
        "for _ in range(20):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    torch.empty(16 << 20).fill_(1.0)  # 64 MB, freed at once\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "print(sorted(faults)[10])  # the median round: the kernel may reclaim idle pages now and then\n"
    )
    faults = {}
    for mode in ("default", "tuned"):
        proc = run_cli([sys.executable, "-c", code, mode])
        assert proc.returncode == 0, proc.stderr[-2000:]
        faults[mode] = float(proc.stdout.split()[-1])
    assert faults["default"] > 10_000 and faults["tuned"] < 100, faults  # 16,384 pages of 4 KiB in 64 MB
