"""examples/slurm: the per-node launch logic, run for two simulated nodes on this machine (loopback, gloo)."""

import os
import subprocess

import pytest

from conftest import ROOT, read_log, train_args

pytestmark = pytest.mark.slow


def test_two_simulated_nodes_derive_ranks_and_address_from_slurm_and_train_together(tmp_path, char_data):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # SLURM's own tool cannot exist here: a stand-in that expands the node list as `scontrol show hostnames` does
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "$3" | tr "," "\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    out = tmp_path / "out"
    procs = []
    for node in (0, 1):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2",
               "SLURM_NODEID": str(node), "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.2", "SLURM_JOB_ID": "4242",
               "NANOGPT_CPU": "1", "NANOGPT_PROCS_PER_NODE": "1"}
        cmd = ["bash", os.path.join(ROOT, "examples", "slurm", "launch_node.sh"),
               *train_args(out, char_data, "--max_iters=4", "--eval_interval=2", "--gradient_accumulation_steps=2")]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert "node 0 of 2: 1 processes, main 127.0.0.1:24242" in outputs[0]
    assert "node 1 of 2: 1 processes, main 127.0.0.1:24242" in outputs[1]
    assert "world size 2" in outputs[0]
    assert [r["iter"] for r in read_log(out) if "val/loss" in r] == [0, 2, 4]


def test_outside_slurm_it_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "slurm", "launch_node.sh")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "run under SLURM" in proc.stderr
