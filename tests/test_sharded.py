"""FSDP2 through the trainer's own loop, on the CPU: `accelerate launch --config_file accelerate_configs/fsdp.yaml`
with 2 processes over gloo, Accelerate's own FSDP2 preparation (fully_shard per Block, its mixed-precision plugin)
and train.py's loop. Accelerate picks FSDP only for GPU process groups; NANOGPT_TEST_FSDP_ON_CPU=1 is the one test
seam (launch.py): it changes that choice and nothing else. Checkpoints hold whole tensors by parameter name, so a
sharded run resumes on one process and a one-process run resumes sharded."""

import json
import os
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TRAIN, read_log, run_cli, run_train, tiny_model, train_losses
from nanogpt_hf.checkpoint import load_tree, save_tree
from nanogpt_hf.config import TrainConfig
from nanogpt_hf.errors import UserError
from nanogpt_hf.optim import configure_optimizer, load_optimizer_state
from nanogpt_hf.tensor_files import TensorInFile, read_whole

FSDP = ["accelerate", "launch", "--config_file", os.path.join(ROOT, "accelerate_configs", "fsdp.yaml"),
        "--num_processes", "2"]
SEAM = {"NANOGPT_TEST_FSDP_ON_CPU": "1"}
# accumulation 4 (2 micro-steps per process), eval_iters 3 (not a multiple of 2: the last draw has a surplus rank)
ARGS = ["--device=cpu", "--max_iters=8", "--eval_interval=4", "--eval_iters=3", "--gradient_accumulation_steps=4",
        "--always_save_checkpoint=true", "--keep_last=2", "--dropout=0.0"]
SPEEDRUN = ["--device=cpu", "--dtype=bfloat16", "--max_iters=6", "--eval_interval=3", "--eval_iters=3",
            "--gradient_accumulation_steps=2", "--always_save_checkpoint=true", "--position_embedding=rope",
            "--qk_norm=true", "--zero_init_residual=true", "--tie_word_embeddings=false", "--optimizer=muon"]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def fsdp_train(out, data, *extra, check=True):
    proc = run_train(out, data, *extra, launcher=FSDP, env=SEAM, check=check)
    assert not check or "world size 2 (FSDP)" in proc.stdout, proc.stdout[-2000:]
    return proc


def resume_from_4(run, copy, launcher):
    """The run's folder copied and rolled back to its checkpoint of iteration 4, then the plainest resume command."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "ckpt-0000008")
    cmd = [*(launcher or [sys.executable]), TRAIN, "--init_from=resume", f"--out_dir={copy}", "--max_iters=8"]
    proc = run_cli(cmd, env=SEAM)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, char_data):
    root = tmp_path_factory.mktemp("fsdp")
    fsdp_train(root / "fsdp", char_data, *ARGS)
    run_train(root / "one", char_data, *ARGS)
    return root


@pytest.mark.slow
def test_fsdp_trainer_accumulates_and_evaluates_like_one_process(runs):
    """Accumulation over 2 micro-steps per rank, evaluation with eval_iters=3 on 2 ranks (every rank runs every
    forward: FSDP2 all-gathers inside it), the loss averaged in fp32: the model folder equals a 1-process run's
    within summation noise (measured 7.5e-9)."""
    assert max_difference(weights(runs / "fsdp"), weights(runs / "one")) < 1e-6
    a, b = read_log(runs / "fsdp"), read_log(runs / "one")
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for x, y in zip(a, b):
        for key in ("train/loss", "val/loss", "train/loss_eval", "grad_norm"):
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=1e-5), (x["iter"], key)


@pytest.mark.slow
def test_fsdp_trainer_saves_the_tied_head_once_and_whole_optimizer_state_by_name(runs):
    ckpt = runs / "fsdp" / "checkpoints" / "ckpt-0000008"
    assert weights(runs / "fsdp").keys() == weights(runs / "one").keys()  # GPT-2's tied head: wte only, as 1 process
    assert "lm_head.weight" not in weights(ckpt / "model")
    state = load_tree(str(ckpt / "optimizer"))
    for name, tensor in weights(ckpt / "model").items():
        assert state["state"][name]["exp_avg"].shape == tensor.shape, name  # whole, not one rank's shard
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(runs / "fsdp")  # the model folder loads (strictly, in the trainer's tests)


@pytest.mark.slow
def test_fsdp_trainer_checkpoint_resumes_bit_exact(runs):
    """Resumed from iteration 4, the same weights and losses, reading rank 0's rows of the optimizer file alone (about half of it; the 0-dim steps whole, 65 rows 33/32)."""
    proc = resume_from_4(runs / "fsdp", runs / "fsdp-resumed", FSDP)
    found = re.search(r"optimizer state: read ([\d.]+) MiB of ([\d.]+) MiB on rank 0", proc.stdout)
    assert found and 0.45 < float(found[1]) / float(found[2]) < 0.55, proc.stdout[-2000:]
    assert max_difference(weights(runs / "fsdp-resumed"), weights(runs / "fsdp")) == 0
    assert train_losses(runs / "fsdp-resumed") == train_losses(runs / "fsdp")


@pytest.mark.slow
def test_fsdp_trainer_checkpoint_resumes_on_one_process_and_back(runs):
    """2 -> 1: the same command on one process keeps the 4 micro-steps per iteration; 1 -> 2: a one-process run
    continues sharded. Both equal the uninterrupted runs up to summation order."""
    proc = resume_from_4(runs / "fsdp", runs / "to-one", ())
    assert "the run was on 2 process(es), now 1: 4 micro-steps per process keep its 512 tokens" in proc.stdout
    assert max_difference(weights(runs / "to-one"), weights(runs / "fsdp")) < 1e-6
    resume_from_4(runs / "one", runs / "to-fsdp", FSDP)
    assert max_difference(weights(runs / "to-fsdp"), weights(runs / "one")) < 1e-6


@pytest.mark.slow
def test_fsdp_trainer_in_bf16_keeps_the_loss_in_fp32_and_trains_muon(tmp_path, char_data):
    """bf16 parameters for compute, gradients reduced in fp32 and outputs not cast: the logged loss is not rounded to
    bf16 (1/64 steps near 4). The speedrun's options (untied head, Muon on sharded matrices) train and resume."""
    out = tmp_path / "out"
    fsdp_train(out, char_data, *SPEEDRUN)
    losses = train_losses(out)
    on_bf16_grid = [v for v in losses.values() if float(torch.tensor(v).bfloat16().float()) == v]
    assert len(on_bf16_grid) < len(losses) / 2, losses
    assert losses[5] < losses[0]
    state = load_tree(str(out / "checkpoints" / "ckpt-0000006" / "optimizer"))
    assert "momentum_buffer" in state["state"]["transformer.h.0.attn.c_attn.weight"]
    reference = weights(out)
    shutil.rmtree(out / "checkpoints" / "ckpt-0000006")
    proc = run_cli([*FSDP, TRAIN, "--init_from=resume", f"--out_dir={out}", "--max_iters=6"], env=SEAM)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_difference(weights(out), reference) == 0


def test_sharded_state_refuses_another_models_parameters(tmp_path):
    model = tiny_model()
    optimizers, _ = configure_optimizer(model, TrainConfig())
    model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    optimizers[0].step()
    from nanogpt_hf.optim import optimizer_state

    save_tree(str(tmp_path / "optimizer"), optimizer_state(model, optimizers))
    other = tiny_model(n_layer=3)
    with pytest.raises(UserError, match="optimizer state is for other parameters"):
        load_optimizer_state(other, configure_optimizer(other, TrainConfig())[0], load_tree(str(tmp_path / "optimizer")), "x")


def test_sharded_loader_reads_a_first_release_checkpoint(tmp_path):
    """Checkpoints written before this format hold torch's positional state_dict: they still resume."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    optimizer.step()
    save_tree(str(tmp_path / "optimizer"), optimizer.state_dict())
    for lazy in (False, True):  # read as the trainer does (left in the file) too
        fresh = torch.optim.AdamW(model.parameters())
        load_optimizer_state(model, fresh, load_tree(str(tmp_path / "optimizer"), lazy=lazy), "old")
        for p in model.parameters():
            assert torch.equal(fresh.state[p]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"])


def test_a_tree_left_in_its_file_reads_rows_alone_as_safetensors_reads_them(tmp_path):
    """load_tree(lazy=True) parses the file's header itself: each tensor (fp32, bf16, int64, 0-dim, empty) and any
    range of rows equal safetensors' own reading; a file cut inside a tensor is one line at the read."""
    stem = str(tmp_path / "tree")
    save_tree(stem, {"a": torch.randn(7, 3), "step": torch.tensor(5.0), "half": torch.randn(4, 2).bfloat16(),
                     "ids": [torch.arange(6).reshape(2, 3)], "none": torch.zeros(0, 3)})
    reference = load_file(stem + ".safetensors")
    lazy = load_tree(stem, lazy=True)
    stored = {"t.a": lazy["a"], "t.step": lazy["step"], "t.half": lazy["half"], "t.ids.0": lazy["ids"][0],
              "t.none": lazy["none"]}
    assert stored.keys() == reference.keys()
    for name, value in stored.items():
        assert isinstance(value, TensorInFile) and value.shape == reference[name].shape
        assert torch.equal(read_whole(value), reference[name]) and read_whole(value).dtype == reference[name].dtype
    assert torch.equal(lazy["a"].rows(2, 5), reference["t.a"][2:5]) and lazy["a"].rows(7, 7).shape == (0, 3)
    with open(stem + ".safetensors", "r+b") as f:
        f.truncate(os.path.getsize(stem + ".safetensors") - 4)
    with pytest.raises(UserError, match="the file ends inside a tensor"):
        read_whole(max((v for v in stored.values() if v.shape.numel()), key=lambda v: v.begin))  # the last one


class DeviceTable:
    """A node's GPUs as torch.cuda's RNG functions see them (one generator state per device, the current device),
    for the checkpoint's RNG code on a machine without GPUs."""

    def __init__(self, count, current):
        self.states = [torch.Generator().manual_seed(100 + i).get_state() for i in range(count)]
        self.current = current

    def is_available(self):
        return bool(self.states)

    def current_device(self):
        return self.current

    def get_rng_state(self, device):
        return self.states[device].clone()

    def set_rng_state(self, state, device):
        self.states[device] = state.clone()  # an IndexError for a device this node lacks, as torch.cuda's


@pytest.mark.parametrize("saved_on, resumed_on", [((8, 5), (1, 0)), ((1, 0), (8, 3)), ((4, 2), (2, 1))])
def test_each_rank_saves_and_restores_its_own_gpus_rng_on_any_number_of_gpus(tmp_path, saved_on, resumed_on):
    """Rank 5 of an 8-GPU node saves its own GPU's state alone; resumed where this rank has GPU 0 of 1 (or the other
    way round), the state lands on the current device and the other devices are untouched. Earlier checkpoints
    (every GPU's state in every rank's file) still load."""
    from nanogpt_hf.checkpoint import rng_state, set_rng_state

    node = DeviceTable(*saved_on)
    save_tree(str(tmp_path / "rank"), {"rng": rng_state(cuda=node)})
    mine = node.states[saved_on[1]]
    other = DeviceTable(*resumed_on)
    untouched = [s.clone() for i, s in enumerate(other.states) if i != resumed_on[1]]
    set_rng_state(load_tree(str(tmp_path / "rank"))["rng"], cuda=other)
    assert torch.equal(other.states[resumed_on[1]], mine)
    assert all(torch.equal(a, b) for a, b in zip(untouched, [s for i, s in enumerate(other.states) if i != resumed_on[1]]))
    old = {**rng_state(cuda=node), "cuda": [s.clone() for s in node.states]}  # the earlier format: every GPU's
    save_tree(str(tmp_path / "old"), {"rng": old})
    set_rng_state(load_tree(str(tmp_path / "old"))["rng"], cuda=other)
    expected = node.states[resumed_on[1]] if resumed_on[1] < len(node.states) else node.states[0]
    assert torch.equal(other.states[resumed_on[1]], expected)


@pytest.mark.slow
def test_fsdp2_muon_gathers_once_per_matrix_saves_keep_state_on_the_writing_rank_and_resumes_read_a_shard(tmp_path):
    """PyTorch's FSDP2 on 2 gloo processes (tests/workers/fsdp_optimizer.py). Muon: one step on 4 sharded matrices
    issues 2 collectives per matrix (gather, then the owner's broadcast; op-by-op Newton-Schulz on the shards issued
    64), and 3 steps equal the one-process run. A checkpoint's gathering of 128 MB of AdamW state into memory (a stop
    signal's save): rank 1 joins every gather and keeps nothing, holding at most a few 16 MB tensors at once (it built
    all 128 MB before); rank 0, which writes, keeps it whole. Streamed to the file (every other save): no rank
    holds more than a few tensors, and the file reads back as the gathered state, bit for bit. Resumed from that
    file, each rank reads and keeps half of it (its rows of each tensor), not all of it."""
    worker = os.path.join(ROOT, "tests", "workers", "fsdp_optimizer.py")
    proc = run_cli(["torchrun", "--standalone", "--nproc_per_node", "2", worker, str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = {r["rank"]: r for r in (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))}
    assert sorted(ranks) == [0, 1]
    for r in ranks.values():
        assert r["muon_collectives"] == 2 * r["matrices"], r
        assert r["max_difference_vs_one_process"] < 1e-6, r  # the same whole-matrix Newton-Schulz as one process (0.0 here)
    writer, other = ranks[0], ranks[1]
    assert writer["kept"] and writer["host_bytes_kept"] >= writer["optimizer_bytes"]
    assert not other["kept"] and other["host_bytes_kept"] < 1e6
    # a gathered tensor, gloo's buffers and the one before it being freed: up to ~3 tensors, never the whole state
    few = 3.5 * other["largest_tensor_bytes"]
    assert other["host_bytes_peak"] <= few < writer["optimizer_bytes"] / 2, other
    for r in (writer, other):
        assert r["stream_peak"] <= few, r
    assert writer["streamed_file_equals_gathered_state"] is True
    # a resume from that file: each rank reads its own rows (half of every tensor; the 0-dim steps whole), holds them
    # in storage of their own and, at most, one tensor more; nothing of the file stays mapped (RSS)
    half = writer["optimizer_bytes"] / 2
    for r in (writer, other):
        resumed = r["resume"]
        assert resumed["equals_saved"] is True
        assert half <= resumed["bytes_read"] < half + 1024 and resumed["bytes_read"] < r["file_bytes"] / 1.9, r
        assert resumed["state_storage_bytes"] == resumed["bytes_read"], r  # c38e359: views of whole tensors
        assert 0.9 * half < resumed["host_bytes_kept"] <= resumed["host_bytes_peak"] < half + r["largest_tensor_bytes"], r
        assert resumed["rss_peak"] < half + r["largest_tensor_bytes"], r
