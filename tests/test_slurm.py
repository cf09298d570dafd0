"""examples/slurm: the per-node launch logic, run for two simulated nodes on this machine (loopback, gloo)."""

import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, read_log, train_args

pytestmark = pytest.mark.slow


def test_two_simulated_nodes_derive_ranks_and_address_from_slurm_and_train_together(tmp_path, char_data):
    env = _slurm_env(tmp_path)
    out = tmp_path / "out"
    procs = [_launch_node(node, out, char_data, env, "--max_iters=4", "--eval_interval=2",
                          "--gradient_accumulation_steps=2") for node in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert "node 0 of 2: 1 processes, main 127.0.0.1:24242" in outputs[0]
    assert "node 1 of 2: 1 processes, main 127.0.0.1:24242" in outputs[1]
    assert "world size 2" in outputs[0]
    assert [r["iter"] for r in read_log(out) if "val/loss" in r] == [0, 2, 4]


def test_a_stop_signal_to_the_tasks_leaves_a_complete_checkpoint_when_the_step_ends(tmp_path, char_data):
    """SIGTERM to both nodes' tasks (SLURM's --signal=TERM@120) while the checkpoint takes 35 s to write (a slow
    shared filesystem): when a task exits, slurmstepd SIGKILLs what is left in the job step, the detached writer
    included. launch_node.sh gives torch's elastic agent 100 s to wait for its workers (its default, 30 s, ended the
    tasks before the writer was done), and the workers wait for the writer: once both tasks have exited and what
    they left is killed, as slurmstepd does, the checkpoint of the step they were on is complete."""
    env = _slurm_env(tmp_path)
    out = tmp_path / "out"
    procs = [_launch_node(node, out, char_data, env, "--max_iters=1000", "--eval_interval=1000",
                          extra_env={"NANOGPT_DELAY_AT": "checkpoint_manifest:35"}) for node in (0, 1)]
    deadline = time.time() + 240
    while not any(r.get("iter", -1) >= 5 for r in _journal(out)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=200)[0] for p in procs]
    subprocess.run(["pkill", "-KILL", "-f", "--", f"--out_dir={out}"])  # slurmstepd: the step's leftovers
    reached = max(r["iter"] for r in read_log(out) if "train/loss" in r)
    folder = out / "checkpoints"
    complete = [int(c.split("-")[1]) for c in os.listdir(folder) if os.path.exists(folder / c / "MANIFEST.json")]
    assert complete and max(complete) >= reached + 1, outputs


def _slurm_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # SLURM's own tool cannot exist here: a stand-in that expands the node list as `scontrol show hostnames` does
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "$3" | tr "," "\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.2", "SLURM_JOB_ID": "4242", "NANOGPT_CPU": "1",
            "NANOGPT_PROCS_PER_NODE": "1"}


def _launch_node(node, out, data, env, *extra, extra_env=None):
    cmd = ["bash", os.path.join(ROOT, "examples", "slurm", "launch_node.sh"), *train_args(out, data, *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**env, "SLURM_NODEID": str(node), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _journal(out):
    try:
        return read_log(out)
    except (OSError, ValueError):
        return []


def test_outside_slurm_it_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "slurm", "launch_node.sh")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "run under SLURM" in proc.stderr
