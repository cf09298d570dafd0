"""The speedrun recipe's trainer side: Muon + AdamW, the warmup-stable-decay schedule, the CPU recipe's size,
resume and DDP with them, and nanogpt-bench --what speedrun end to end (shrunk)."""

import os

import pytest
import torch

from conftest import ROOT, run_train, tiny_model, train_losses
from nanogpt_hf.config import TrainConfig, load_config, model_options
from nanogpt_hf.optim import Muon, configure_optimizer, get_lr

SPEEDRUN = ["--optimizer=muon", "--lr_schedule=wsd", "--position_embedding=rope", "--norm=rmsnorm", "--qk_norm=true",
            "--activation_function=relu2", "--zero_init_residual=true", "--logit_softcap=15", "--tie_word_embeddings=false"]


def test_wsd_schedule_warms_up_holds_then_decays_linearly():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=100, lr_schedule="wsd",
                      cooldown_frac=0.4)
    assert get_lr(0, cfg) == pytest.approx(1 / 11) and get_lr(9, cfg) == pytest.approx(10 / 11)
    assert get_lr(10, cfg) == get_lr(59, cfg) == get_lr(60, cfg) == 1.0  # stable until 60% of lr_decay_iters
    assert get_lr(80, cfg) == pytest.approx(0.1 + 0.5 * 0.9)  # halfway down the linear cooldown
    assert get_lr(100, cfg) == pytest.approx(0.1) and get_lr(500, cfg) == 0.1
    cosine = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=100)
    assert get_lr(55, cosine) == pytest.approx(0.55)  # nanoGPT's cosine is still the default


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model(tie_word_embeddings=False, bias=True)
    adamw, muon = configure_optimizer(model, TrainConfig(optimizer="muon", learning_rate=2e-3, muon_lr=0.04))[0]
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {p: n for n, p in model.named_parameters()}
    in_muon = {names[p] for g in muon.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if p.dim() == 2 and ".h." in n}
    in_adamw = {names[p] for g in adamw.param_groups for p in g["params"]}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight", "transformer.ln_f.weight"} <= in_adamw
    assert not in_muon & in_adamw and len(in_muon | in_adamw) == len(names)
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(20.0)
    assert len(configure_optimizer(model, TrainConfig())[0]) == 1  # adamw alone by default


def test_cpu_speedrun_recipe_stays_within_the_parameter_budget():
    from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM

    classic, _ = load_config(["--config", "train_shakespeare_char_cpu"])
    speedrun, _ = load_config(["--config", "speedrun_shakespeare_char_cpu"])
    vocab = 65 + 2  # Tiny Shakespeare's characters, <pad> and <|endoftext|>
    count = [NanoGPTForCausalLM(NanoGPTConfig(vocab_size=vocab, **model_options(c))).num_parameters()
             for c in (classic, speedrun)]
    assert count[1] <= 1.1 * count[0] and count[1] <= 890_000, count
    assert speedrun.optimizer == "muon" and speedrun.max_iters < classic.max_iters and speedrun.dataset == classic.dataset
    assert (speedrun.batch_size, speedrun.block_size) == (classic.batch_size, classic.block_size)
    gpt2, _ = load_config(["--config", "speedrun_gpt2"])
    assert gpt2.n_layer == 12 and gpt2.n_embd == 768 and gpt2.optimizer == "muon" and gpt2.lr_schedule == "wsd"
    assert 120e6 < NanoGPTForCausalLM(NanoGPTConfig(vocab_size=50304, **model_options(gpt2))).num_parameters() < 170e6


def test_resuming_with_another_optimizer_is_refused(tmp_path):
    """A Muon run's checkpoint offered to AdamW alone (what --optimizer=adamw on resume would build)."""
    from nanogpt_hf.errors import UserError
    from nanogpt_hf.optim import load_optimizer_state, optimizer_state

    model = tiny_model()
    muon_state = optimizer_state(model, configure_optimizer(model, TrainConfig(optimizer="muon"))[0])
    with pytest.raises(UserError, match="optimizer state is for other parameters or another optimizer"):
        load_optimizer_state(model, configure_optimizer(model, TrainConfig())[0], muon_state, "ckpt")


@pytest.mark.slow
def test_speedrun_options_train_under_ddp_on_a_cpu_without_native_bf16(tmp_path, char_data):
    """The speedrun's options and Muon under DDP, on a CPU profile without native bf16 (oneDNN limited to AVX2):
    Newton-Schulz runs in fp32 (one line says so), and bf16 autocast says in one line that it will be slower."""
    proc = run_train(tmp_path / "ddp", char_data, *SPEEDRUN, "--max_iters=6", "--eval_interval=3",
                     "--gradient_accumulation_steps=2", "--dtype=bfloat16", env={"ONEDNN_MAX_CPU_ISA": "AVX2"},
                     launcher=["accelerate", "launch", "--config_file", os.path.join(ROOT, "accelerate_configs", "cpu_ddp.yaml")])
    assert "world size 2" in proc.stdout and "Muon (float32) + fused AdamW" in proc.stdout
    assert "Muon's Newton-Schulz runs in float32 (no native bf16 on this CPU; muon_ns_dtype=auto)" in proc.stdout
    assert "warning: dtype=bfloat16 on this CPU (no AVX512-BF16/AMX) is emulated" in proc.stdout
    assert __import__("yaml").safe_load(open(tmp_path / "ddp" / "train_config.yaml"))["muon_ns_dtype"] == "float32"
    losses = train_losses(tmp_path / "ddp")
    assert losses[5] < losses[0]


@pytest.mark.slow
def test_bench_speedrun_races_the_classic_recipe_end_to_end():
    from nanogpt_hf.bench import bench_speedrun

    shrink = ["--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10", "--n_layer=1", "--n_embd=64",
              "--log_interval=10"]
    result = bench_speedrun(extra=shrink)
    assert result["classic"] == "classic recipe (nanoGPT's settings)"
    assert 1.5 < result["target_val_loss"] < 4.2 and 1.5 < result["speedrun_val_loss"] < 4.2
    assert result["reached"] == (result["speedrun_val_loss"] <= result["target_val_loss"])
    assert result["classic_seconds"] > 0 and result["time_ratio"] == pytest.approx(
        result["speedrun_seconds"] / result["classic_seconds"])
    seconds, iteration, loss = result["classic_at_equal_time"] or (0, 0, 0)
    assert seconds <= result["speedrun_seconds"] and iteration in (0, 10, 20)


def test_nanogpt_checkpoint_scores_like_our_model(tmp_path):
    """A nanoGPT ckpt.pt (its dict layout, compiled-model key prefix) loads for the full-pass scoring."""
    from nanogpt_hf.bench.speedrun import _nanogpt_checkpoint_model

    model = tiny_model(bias=False, activation_function="gelu")
    cfg = model.config
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
                "model_args": dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                                   bias=False, vocab_size=cfg.vocab_size, dropout=0.0),
                "iter_num": 5, "best_val_loss": torch.tensor(2.0), "config": {"dataset": "shakespeare_char"}},
               tmp_path / "ckpt.pt")
    loaded = _nanogpt_checkpoint_model(str(tmp_path / "ckpt.pt")).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_muon_equals_torch_muon_and_its_fp32_newton_schulz_stays_within_bf16_noise():
    """optim.Muon in bf16 is torch.optim.Muon bit for bit (update, momentum, weight decay, the tall-matrix scale);
    in fp32 (chosen where bf16 is emulated) the update differs by bf16's rounding only."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32, 96), (128, 128)]
    start = [torch.randn(*s) for s in shapes]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(3)]

    def trained(make):
        params = [w.clone().requires_grad_() for w in start]
        optimizer = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        return params, optimizer

    ours, opt = trained(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1))
    torchs, ref = trained(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1))
    assert all(torch.equal(a, b) for a, b in zip(ours, torchs))
    assert all(torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"]) for a, b in zip(ours, torchs))
    fp32, _ = trained(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32))
    for a, b, w in zip(fp32, torchs, start):
        change = (b - w).abs().max()
        assert 0 < (a - b).abs().max() < 0.05 * change
