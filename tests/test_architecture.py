"""The speedrun's opt-in architecture options (NanoGPTConfig): each against an independent reference where one
exists, and every option keeps the model a transformers model (save/load, KV-cache generation past block_size,
pipeline, fresh-process remote code, export refusing or mapping)."""

import pytest
import torch
from transformers import pipeline

from conftest import FP32_ATOL, FP32_RTOL, assert_greedy_choices, run_cli, run_python, tiny_model
from nanogpt_hf import NanoGPTForCausalLM
from nanogpt_hf.model_io import save_model_folder
from nanogpt_hf.tokenization import char_tokenizer

OPTIONS = {
    "rope": dict(position_embedding="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation_function="relu2"),
    "zero_init": dict(zero_init_residual=True),
    "softcap": dict(logit_softcap=5.0),
    "untied": dict(tie_word_embeddings=False),
}
ALL = {k: v for option in OPTIONS.values() for k, v in option.items()}
CHARS = sorted(set("ROMEO: But soft, what light through yonder window breaks?\n"))


def randomized(model, seed=0):
    """Weights away from their init (zero-init projections would hide every other option's effect)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("name", [*OPTIONS, "all"])
def test_option_round_trips_and_generates_with_the_cache_past_block_size(name, tmp_path):
    options = ALL if name == "all" else OPTIONS[name]
    model = randomized(tiny_model(**options, vocab_size=len(CHARS) + 2))
    x = torch.randint(0, len(CHARS), (2, 12))
    model.save_pretrained(tmp_path)
    loaded = NanoGPTForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == options.get("tie_word_embeddings", True)
    cached = model.generate(x, max_new_tokens=40, do_sample=False)  # 52 > block_size 32: the context is cropped
    uncached = model.generate(x, max_new_tokens=40, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.manual_seed(1)
    seed_api = model.generate(x, 40, temperature=1.0, top_k=1)  # nanoGPT's loop, over the cache
    assert torch.equal(seed_api, cached)
    # the inference fast path computes the same numbers as forward() with a cache, prefill and one-token steps alike
    from transformers.cache_utils import DynamicCache

    # (two computations: lm_head over a (B, 1, C) slice vs (B, T, C) rounds differently on some CPUs, ~1e-7 on an
    # AMD EPYC, so fp32 rounding is allowed and the greedy tokens must agree)
    fast, regular = DynamicCache(config=model.config), DynamicCache(config=model.config)
    longer = torch.cat([x, cached[:, 12:13]], dim=1)
    with torch.no_grad():
        for ours, reference in ((model.decode_logits(x, fast), model(x, cache=regular, use_cache=True).logits[:, -1]),
                                (model.decode_logits(longer, fast),
                                 model(longer[:, -1:], cache=regular, use_cache=True).logits[:, -1])):
            torch.testing.assert_close(ours, reference, rtol=FP32_RTOL, atol=FP32_ATOL)
            assert_greedy_choices(ours.argmax(-1), reference)


def test_rope_equals_transformers_llama_rotary():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from nanogpt_hf.modeling_nanogpt import _rotary, _rotate

    B, nh, T, hs = 2, 3, 10, 8
    q, k = torch.randn(B, nh, T, hs), torch.randn(B, nh, T, hs)
    positions = torch.arange(T)
    llama = LlamaRotaryEmbedding(LlamaConfig(hidden_size=nh * hs, num_attention_heads=nh, rope_theta=10000.0))
    cos, sin = llama(q, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours = _rotary(positions, hs, 10000.0, q.dtype)
    assert torch.allclose(_rotate(q, *ours), ref_q, atol=1e-6) and torch.allclose(_rotate(k, *ours), ref_k, atol=1e-6)


def test_rope_attention_depends_on_relative_positions_only():
    model = randomized(tiny_model(position_embedding="rope"))
    assert model.transformer.wpe is None
    x = torch.randint(0, 96, (1, 8))
    a = model(x).logits
    b = model(x, position_ids=torch.arange(8) + 5).logits  # every position shifted: the same relative distances
    assert torch.allclose(a, b, atol=1e-4)


def test_relu2_rmsnorm_softcap_zero_init_match_their_definitions():
    from transformers.activations import ACT2FN

    model = randomized(tiny_model(**ALL))
    mlp, h = model.transformer.h[0].mlp, torch.randn(3, 32)
    assert torch.allclose(mlp(h), mlp.c_proj(ACT2FN["relu2"](mlp.c_fc(h))), atol=1e-6)
    norm = model.transformer.h[0].ln_1
    assert isinstance(norm, torch.nn.RMSNorm)
    assert torch.allclose(norm(h), h / h.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * norm.weight, atol=1e-5)
    logits = model(torch.randint(0, 96, (2, 16))).logits
    assert logits.abs().max() < 5.0  # soft-capped at 5
    fresh = tiny_model(**ALL)
    for block in fresh.transformer.h:
        assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
        assert block.attn.c_attn.weight.std() > 0.01


def test_gpt2_defaults_are_unchanged():
    model = tiny_model()
    cfg = model.config
    assert (cfg.position_embedding, cfg.norm, cfg.qk_norm, cfg.zero_init_residual, cfg.logit_softcap,
            cfg.tie_word_embeddings) == ("learned", "layernorm", False, False, None, True)
    assert isinstance(model.transformer.h[0].ln_1, torch.nn.LayerNorm)


def test_untied_head_exports_to_gpt2_and_other_options_refuse_in_one_line(tmp_path):
    tok = char_tokenizer(CHARS, model_max_length=32)
    untied = randomized(tiny_model(tie_word_embeddings=False, vocab_size=len(tok)))
    save_model_folder(untied, tok, str(tmp_path / "untied"))
    from transformers import GPT2LMHeadModel

    from nanogpt_hf.export import export_gpt2

    export_gpt2(str(tmp_path / "untied"), str(tmp_path / "gpt2"))
    gpt2 = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    x = torch.randint(0, len(tok), (2, 10))
    assert torch.allclose(gpt2(x).logits, untied(x).logits, atol=1e-5)
    for name in ("rope", "rmsnorm", "qk_norm", "relu2", "softcap"):
        with pytest.raises(ValueError, match="GPT2LMHeadModel cannot compute"):
            tiny_model(**OPTIONS[name]).to_gpt2()
    save_model_folder(tiny_model(**ALL, vocab_size=len(tok)), tok, str(tmp_path / "all"))
    proc = run_cli(["nanogpt-export", str(tmp_path / "all"), str(tmp_path / "all-gpt2")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot export to GPT-2" in lines[0] and "trust_remote_code" in lines[0], lines
    assert "position_embedding='rope'" in lines[0] and "activation_function='relu2'" in lines[0]
    assert not (tmp_path / "all-gpt2").exists()


@pytest.mark.slow
def test_all_options_load_in_a_fresh_process_and_run_the_pipeline(tmp_path):
    tok = char_tokenizer(CHARS, model_max_length=32)
    model = randomized(tiny_model(**ALL, vocab_size=len(tok)))
    save_model_folder(model, tok, str(tmp_path))
    x = torch.randint(0, len(tok), (1, 9))
    torch.save({"x": x, "logits": model(x).logits.detach()}, tmp_path / "ref.pt")
    expected = pipeline("text-generation", model=model, tokenizer=tok)("ROMEO:", max_new_tokens=40, do_sample=False)
    proc = run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, pipeline
        ref = torch.load({str(tmp_path / "ref.pt")!r}, weights_only=True)
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules")
        assert torch.allclose(model(ref["x"]).logits, ref["logits"], atol=1e-6)
        pipe = pipeline("text-generation", model={str(tmp_path)!r}, trust_remote_code=True)
        print("TEXT=" + repr(pipe("ROMEO:", max_new_tokens=40, do_sample=False)[0]["generated_text"]))
        """,
        hide_package=True,
    )
    assert f"TEXT={expected[0]['generated_text']!r}" in proc.stdout
