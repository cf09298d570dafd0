"""nanogpt-bench --what memory: the activation count on the meta device equals the count on real tensors, and
the table's parameter counts equal transformers' GPT-2."""

import torch

from conftest import tiny_config
from nanogpt_hf.memory import activation_bytes, format_memory_table, memory_table


def test_meta_device_activation_count_equals_a_real_forward():
    config = tiny_config(block_size=64)
    for ckpt in (False, True):  # fp32: this CPU's SDPA runs a flash kernel, as GPUs do (in bf16 it falls back to math)
        meta = activation_bytes(config, torch.float32, ckpt, batch=2, seq=64)
        real = activation_bytes(config, torch.float32, ckpt, batch=2, seq=64, device="cpu")
        assert meta == real > 0, ckpt
    full = activation_bytes(config, batch=2, seq=64)
    # math attention keeps n_layer x (B, nh, T, T) probabilities instead of (B, nh, T) log-sum-exps
    assert activation_bytes(config, batch=2, seq=64, fused_attention=False) - full == 2 * 2 * 2 * 64 * (64 - 1) * 4
    assert activation_bytes(config, checkpointing=True, seq=64) < full


def test_memory_table_counts_gpt2s_parameters_and_orders_the_setups():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        reference = GPT2LMHeadModel(GPT2Config()).num_parameters()  # 124M, tied head counted once
    rows = memory_table(names=("gpt2",), seq=128)
    assert rows[0]["params"] == reference and rows[0]["adamw"] == 8 * reference
    for row in rows:
        need = row["per_gpu"]
        assert need["DDP"] > need["1 GPU"] > need["FSDP 2"] > need["FSDP 4"] > need["FSDP 8"]
    by = {(r["precision"], r["checkpointing"]): r["activations"] for r in rows}
    assert by["fp32", False] > by["bf16", False] > by["bf16", True]
    assert "| gpt2 | 124M | fp32 | no |" in format_memory_table(rows)
