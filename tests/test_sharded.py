"""Sharded (FSDP2) checkpoints: the optimizer state is saved whole by parameter name and loads on any number of
processes. Real torch.distributed.fsdp.fully_shard over gloo on the CPU, each leg a torchrun of
tests/workers/fsdp_worker.py; the trainer's AdamW, the checkpoint module's save and load."""

import os
import sys

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file

from nanogpt_hf.checkpoint import load_tree

WORKER = os.path.join(ROOT, "tests", "workers", "fsdp_worker.py")


def leg(nproc, *args):
    proc = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    WORKER, *map(str, args)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def opt_state(stem):
    return load_tree(str(stem))


def max_difference(a, b):
    """Largest difference between two weight files' or two optimizer states' tensors (same keys required)."""
    if "state" in a:
        assert a["param_groups"] == b["param_groups"]
        a = {f"{n}.{k}": v for n, s in a["state"].items() for k, v in s.items()}
        b = {f"{n}.{k}": v for n, s in b["state"].items() for k, v in s.items()}
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """2 FSDP2 processes train 4 steps, saving after step 2 (mid) and at the end (ref)."""
    root = tmp_path_factory.mktemp("fsdp")
    leg(2, "--fsdp", 1, "--steps", 4, "--save", root / "ref", "--save_at", 2, "--save_mid", root / "mid")
    return root


def test_fsdp_checkpoint_holds_the_whole_optimizer_state_by_name(fsdp_run):
    state = opt_state(fsdp_run / "mid" / "optimizer")
    model = weights(fsdp_run / "mid")
    assert "lm_head.weight" not in state["state"]  # tied to wte: one entry
    for name, tensor in model.items():
        if name.endswith(".bias") and "attn.bias" in name:
            continue
        assert state["state"][name]["exp_avg"].shape == tensor.shape, name  # whole, not one rank's shard
        assert state["state"][name]["exp_avg"].abs().sum() > 0, name


def test_fsdp_resume_on_two_processes_is_bit_exact(fsdp_run, tmp_path):
    leg(2, "--fsdp", 1, "--load", fsdp_run / "mid", "--steps", 2, "--save", tmp_path / "resumed")
    assert max_difference(opt_state(tmp_path / "resumed-loaded"), opt_state(fsdp_run / "mid" / "optimizer")) == 0
    assert max_difference(weights(tmp_path / "resumed"), weights(fsdp_run / "ref")) == 0
    assert max_difference(opt_state(tmp_path / "resumed" / "optimizer"), opt_state(fsdp_run / "ref" / "optimizer")) == 0


@pytest.fixture(scope="module")
def one_process(fsdp_run):
    """2 -> 1: the sharded checkpoint after step 2 continued on one plain process to step 4 (saved at the end)."""
    leg(1, "--fsdp", 0, "--load", fsdp_run / "mid", "--steps", 2, "--save", fsdp_run / "one")
    return fsdp_run / "one"


def test_sharded_checkpoint_resumes_on_one_process(fsdp_run, one_process):
    """2 -> 1: the state loads exactly; the next steps match the 2-process run up to summation order."""
    assert max_difference(opt_state(str(one_process) + "-loaded"), opt_state(fsdp_run / "mid" / "optimizer")) == 0
    assert max_difference(weights(one_process), weights(fsdp_run / "ref")) < 1e-4  # measured 5e-6
    assert max_difference(opt_state(one_process / "optimizer"), opt_state(fsdp_run / "ref" / "optimizer")) < 1e-6


def test_one_process_checkpoint_reshards_onto_two_fsdp_processes(one_process, tmp_path):
    """1 -> 2: each rank takes its shard of the whole tensors; gathered back they equal the file, and training
    goes on (steps 5 and 6 of the same run)."""
    leg(2, "--fsdp", 1, "--load", one_process, "--steps", 2, "--save", tmp_path / "sharded")
    assert max_difference(opt_state(tmp_path / "sharded-loaded"), opt_state(one_process / "optimizer")) == 0
    assert 0 < max_difference(weights(tmp_path / "sharded"), weights(one_process)) < 0.1  # it trained on


def test_sharded_state_refuses_another_models_parameters(fsdp_run):
    from nanogpt_hf.checkpoint import load_optimizer_state
    from nanogpt_hf.errors import UserError
    from conftest import tiny_model

    model = tiny_model(n_layer=3)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(UserError, match="optimizer state is for other parameters"):
        load_optimizer_state(model, optimizer, opt_state(fsdp_run / "mid" / "optimizer"), "mid")


def test_sharded_loader_reads_a_first_release_checkpoint(tmp_path):
    """Checkpoints written before this format hold torch's positional state_dict: they still resume."""
    from conftest import tiny_model

    from nanogpt_hf.checkpoint import load_optimizer_state, save_tree

    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    optimizer.step()
    save_tree(str(tmp_path / "optimizer"), optimizer.state_dict())
    fresh = torch.optim.AdamW(model.parameters())
    load_optimizer_state(model, fresh, load_tree(str(tmp_path / "optimizer")), "old")
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"])


def test_fsdp_resume_with_muon_is_bit_exact(tmp_path):
    """Muon's momentum (and AdamW's moments for the rest) through the same path, sharded over 2 processes."""
    leg(2, "--fsdp", 1, "--optimizer", "muon", "--steps", 4, "--save", tmp_path / "ref", "--save_at", 2,
        "--save_mid", tmp_path / "mid")
    leg(2, "--fsdp", 1, "--optimizer", "muon", "--load", tmp_path / "mid", "--steps", 2, "--save", tmp_path / "resumed")
    saved = opt_state(tmp_path / "mid" / "optimizer")
    assert "momentum_buffer" in saved["state"]["transformer.h.0.attn.c_attn.weight"]
    assert "exp_avg" in saved["state"]["transformer.wte.weight"]
    assert max_difference(weights(tmp_path / "resumed"), weights(tmp_path / "ref")) == 0
    assert max_difference(opt_state(tmp_path / "resumed" / "optimizer"), opt_state(tmp_path / "ref" / "optimizer")) == 0
