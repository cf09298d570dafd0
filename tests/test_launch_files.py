"""The launch files in accelerate_configs/, read by Accelerate's own launcher code, and launched where they cannot
work here (GPU files on a machine without GPUs, a node whose master is unreachable): they stop with a message."""

import os
import time

import pytest
import torch

from conftest import ROOT, TRAIN, run_cli

CONFIGS = os.path.join(ROOT, "accelerate_configs")


def launch_args(name, *extra):
    """The arguments `accelerate launch --config_file accelerate_configs/NAME ...` resolves to."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", os.path.join(CONFIGS, name), *extra, TRAIN])
    return _validate_launch_command(args)[0]


def test_fsdp_launch_file_is_fsdp2_with_the_models_no_split_modules(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from conftest import tiny_model

    for key, value in prepare_multi_gpu_env(launch_args("fsdp.yaml")).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(tiny_model())
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["Block"]  # from NanoGPTForCausalLM._no_split_modules


def test_multi_node_launch_file_bounds_the_rendezvous():
    assert launch_args("multi_node.yaml").rdzv_conf == "timeout=30"
    assert launch_args("multi_node.yaml", "--rdzv_conf", "timeout=600").rdzv_conf == "timeout=600"  # the CLI wins


def _default_config(hf_home, **answers):
    """$HF_HOME/accelerate/default_config.yaml as `accelerate config` writes it (its own ClusterConfig class)."""
    from accelerate.commands.config.config_args import ClusterConfig

    path = hf_home / "accelerate" / "default_config.yaml"
    path.parent.mkdir(parents=True)
    ClusterConfig(compute_environment="LOCAL_MACHINE", mixed_precision="no", debug=False, machine_rank=0,
                  num_machines=1, **answers).to_yaml_file(str(path))
    return {"HF_HOME": str(hf_home)}


@pytest.mark.slow
def test_bare_accelerate_launch_uses_the_accelerate_config_default(tmp_path, char_data):
    """`accelerate config` answered "No distributed training", CPU only: a bare `accelerate launch` trains with it.
    Answered "multi-CPU" with 2 processes and no mpirun: Accelerate would start ONE plain process, so the trainer
    stops with one line instead of training alone."""
    common = ["accelerate", "launch", TRAIN, "--config", "train_shakespeare_char_cpu", "--n_layer=1", "--n_head=1",
              "--n_embd=16", "--block_size=16", "--batch_size=2", "--eval_iters=1", "--max_iters=2",
              f"--data_dir={char_data}"]
    env = _default_config(tmp_path / "one", distributed_type="NO", num_processes=1, use_cpu=True)
    one = run_cli([*common, f"--out_dir={tmp_path / 'one-out'}"], env=env)
    assert one.returncode == 0 and "world size 1 (NO)" in one.stdout, one.stderr[-2000:]
    env = _default_config(tmp_path / "multi", distributed_type="MULTI_CPU", num_processes=2, use_cpu=True,
                          mpirun_config={})
    multi = run_cli([*common, f"--out_dir={tmp_path / 'multi-out'}"], env=env)
    errors = [ln for ln in (multi.stdout + multi.stderr).splitlines() if ln.startswith("error:")]
    assert multi.returncode != 0 and len(errors) == 1, multi.stdout + multi.stderr
    assert "asked for several processes but started one" in errors[0] and "cpu_ddp.yaml" in errors[0]
    assert "nanogpt_hf/" not in multi.stderr and not (tmp_path / "multi-out").exists()
    # the one line is all: Accelerate's one-process launcher, asked to stop, prints no CalledProcessError traceback
    assert "Traceback" not in multi.stderr and multi.stderr.strip().splitlines()[-1] == errors[0], multi.stderr
    assert multi.returncode == 143


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without GPUs")
@pytest.mark.parametrize("name", ["fsdp.yaml"])  # single_gpu.yaml and multi_gpu.yaml: the same check
def test_gpu_launch_files_stop_with_one_line_without_gpus(name, tmp_path, char_data):
    proc = run_cli(["accelerate", "launch", "--config_file", os.path.join(CONFIGS, name), "--num_processes", "2"
                    if name != "single_gpu.yaml" else "1", TRAIN, "--config", "train_shakespeare_char_cpu",
                    "--device=auto", f"--data_dir={char_data}", f"--out_dir={tmp_path / 'out'}", "--max_iters=2"])
    assert proc.returncode != 0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "is for GPUs" in lines[0] and "--device=cpu" in lines[0], proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()
    # the launcher's torchrun agent, asked to stop, prints no ChildFailedError traceback (only a line per worker)
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
    assert proc.returncode == 143  # stopped with SIGTERM, as the agent stops workers after a failure


@pytest.mark.slow
def test_multi_node_launch_file_with_an_unreachable_master_ends_in_bounded_time(tmp_path):
    """The shipped file (30 s rendezvous timeout: 55 s in all, measured) with the timeout set to 5 s on the
    command line, the way the file's comment tells users to change it: the wait is the timeout's, not 600 s."""
    t0 = time.monotonic()
    proc = run_cli(["accelerate", "launch", "--config_file", os.path.join(CONFIGS, "multi_node.yaml"), "--machine_rank",
                    "1", "--rdzv_conf", "timeout=5", TRAIN, "--config", "train_shakespeare_char_cpu"], cwd=tmp_path,
                   timeout=300)
    seconds = time.monotonic() - t0
    assert proc.returncode != 0 and seconds < 300, seconds  # not the default 600 s: room for a loaded machine
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert "timed out" in last and "123.456.123.456, 29500" in last, last
