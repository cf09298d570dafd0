"""NanoGPTForCausalLM against transformers' GPT2LMHeadModel and nanoGPT's behaviour."""

import math

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import assert_greedy_sequence, tiny_config, tiny_model
from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(block_size=0), "block_size"),
        (dict(n_head=0), "n_head"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(activation_function="relu"), "activation_function"),
    ],
)
def test_config_rejects_invalid_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_defaults_and_hf_names():
    cfg = NanoGPTConfig()
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.bias) == (
        50304, 1024, 12, 12, 768, 0.0, True)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.max_position_embeddings) == (
        768, 12, 12, 1024)
    cfg.hidden_size = 64  # writes through to nanoGPT's name
    assert cfg.n_embd == 64
    assert isinstance(AutoConfig.for_model("nanogpt"), NanoGPTConfig)


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(NanoGPTConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=256))
    expected_scaled = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - expected_scaled) < 0.1 * expected_scaled, name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert abs(p.std().item() - 0.02) < 0.002, name
        elif name.endswith(".bias"):
            assert p.abs().max().item() == 0.0, name
    assert model.lm_head.weight is model.transformer.wte.weight  # weight tying


def _random_gpt2(bias_zero=False, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (biases and LayerNorms included)
        for name, p in model.named_parameters():
            p.copy_(torch.zeros_like(p) if (bias_zero and name.endswith("bias") and "ln" not in name) else torch.randn_like(p) * 0.1 + (1.0 if "ln" in name and name.endswith("weight") else 0.0))
    return model


@pytest.mark.parametrize("layout", ["GPT2LMHeadModel", "GPT2Model-with-mask-buffers"])
def test_from_gpt2_matches_transformers_logits(tmp_path, layout):
    gpt2 = _random_gpt2()
    state = {k: v for k, v in gpt2.state_dict().items() if k != "lm_head.weight"}  # tied: not stored
    if layout != "GPT2LMHeadModel":  # the original hub layout: no `transformer.` prefix, attention-mask buffers
        state = {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
        for i in range(2):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    from safetensors.torch import save_file

    gpt2.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    ours = NanoGPTForCausalLM.from_gpt2(str(tmp_path)).eval()
    x = torch.randint(0, 96, (3, 32))
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, gpt2(x).logits, atol=1e-5)
    # greedy generation token for token
    g_ours = ours.generate(x[:, :5], max_new_tokens=20, do_sample=False)
    g_ref = gpt2.generate(x[:, :5], max_new_tokens=20, do_sample=False)
    assert torch.equal(g_ours, g_ref)


def test_from_gpt2_reads_pytorch_model_bin(tmp_path):
    gpt2 = _random_gpt2(seed=1)
    gpt2.config.save_pretrained(tmp_path)
    torch.save(gpt2.state_dict(), tmp_path / "pytorch_model.bin")
    ours = NanoGPTForCausalLM.from_gpt2(str(tmp_path), dropout=0.1).eval()
    assert ours.config.dropout == 0.1
    x = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, gpt2(x).logits, atol=1e-5)


@pytest.mark.parametrize("bias, activation", [(True, "gelu_new"), (False, "gelu_new"), (False, "gelu")])
def test_to_gpt2_is_the_same_function(bias, activation):
    ours = tiny_model(bias=bias, activation_function=activation)
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for name, p in ours.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    gpt2 = ours.to_gpt2().eval()
    assert gpt2.config.activation_function == activation
    x = torch.randint(0, 96, (3, 32))
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, gpt2(x).logits, atol=1e-5)
    if not bias:
        assert all(p.abs().max() == 0 for n, p in gpt2.named_parameters() if n.endswith("bias") and "ln" not in n)
    assert torch.equal(ours.generate(x[:, :4], max_new_tokens=25, do_sample=False),
                       gpt2.generate(x[:, :4], max_new_tokens=25, do_sample=False))


def test_exact_and_tanh_gelu_are_different_functions_and_load_from_gpt2_folders(tmp_path):
    """nanoGPT's exact GELU is not GPT-2's tanh one: the switch takes effect, and a GPT-2 folder's own
    activation_function is kept when it loads (logits equal GPT2LMHeadModel's for both)."""
    x = torch.randint(0, 96, (2, 32))
    logits = {}
    for activation in ("gelu", "gelu_new"):
        gpt2 = _random_gpt2(seed=2)
        gpt2.config.activation_function = activation
        gpt2 = GPT2LMHeadModel(gpt2.config).eval()
        gpt2.load_state_dict(_random_gpt2(seed=2).state_dict())
        gpt2.save_pretrained(tmp_path / activation)
        ours = NanoGPTForCausalLM.from_gpt2(str(tmp_path / activation)).eval()
        assert ours.config.activation_function == activation
        with torch.no_grad():
            logits[activation] = ours(x).logits
            assert torch.allclose(logits[activation], gpt2(x).logits, atol=1e-5)
    assert not torch.allclose(logits["gelu"], logits["gelu_new"], atol=1e-4)  # same weights, other function


def test_export_folder_round_trips_through_plain_transformers(tmp_path):
    ours = tiny_model(bias=False)
    ours.to_gpt2().save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # no remote code: a vanilla GPT-2 folder
    assert type(plain).__name__ == "GPT2LMHeadModel"
    back = NanoGPTForCausalLM.from_gpt2(str(tmp_path), bias=False)
    x = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        assert torch.allclose(back(x).logits, ours(x).logits, atol=1e-5)


def test_kv_cache_greedy_equals_no_cache_greedy(tiny):
    x = torch.randint(0, 96, (2, 6))
    with_cache = tiny.generate(x, max_new_tokens=25, do_sample=False, use_cache=True)
    without = tiny.generate(x, max_new_tokens=25, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_left_padding_gives_the_unpadded_result(tiny):
    a, b = torch.randint(0, 96, (1, 8)), torch.randint(0, 96, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)
    batch = torch.cat([a, padded])
    mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    out = tiny.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    alone = tiny.generate(b, max_new_tokens=10, do_sample=False)
    assert torch.equal(out[1, -10:], alone[0, -10:])
    assert torch.equal(out[0], tiny.generate(a, max_new_tokens=10, do_sample=False)[0])


@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)])
def test_generate_takes_the_fast_loop_with_transformers_tokens(sampling):
    """transformers' generate runs our decode loop where nothing of its general loop is needed: the same tokens as
    its own loop (return_dict_in_generate forces that one), greedy and seeded sampling, an end-of-text stop in a
    batch; a hook on a block sends it back to the general loop, which calls the hook."""
    model = tiny_model(seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20) if p.dim() == 2 else None  # varied continuations, and some stop at eos
    x = torch.randint(0, 96, (3, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=30, eos_token_id=7, pad_token_id=0, attention_mask=torch.ones_like(x), **sampling)
    torch.manual_seed(5)
    fast = model.generate(x, **kw)
    torch.manual_seed(5)
    general = model.generate(x, return_dict_in_generate=True, **kw).sequences
    assert torch.equal(fast, general)
    calls = []
    handle = model.transformer.h[0].register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(5)
    assert torch.equal(model.generate(x, **kw), fast) and len(calls) > 1
    handle.remove()



def test_a_streamer_gets_transformers_calls_from_the_fast_loop():
    """generate(streamer=...) (TextStreamer, TextIteratorStreamer) decodes in our loop too: the streamer gets what
    transformers' own loop hands it (the prompt, then each step's tokens with pad after an end-of-text, then end()),
    and a TextIteratorStreamer read in another thread yields the text of the returned tokens."""
    import threading

    from transformers import TextIteratorStreamer
    from transformers.generation.streamers import BaseStreamer

    from nanogpt_hf.tokenization import char_tokenizer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.clone())

        def end(self):
            self.calls.append("end")

    model = tiny_model(seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20) if p.dim() == 2 else None  # varied continuations, and some stop at eos
    steps = []
    model.decode_logits = lambda *a, _f=model.decode_logits: steps.append(1) or _f(*a)
    x = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=27, eos_token_id=7, pad_token_id=0, attention_mask=torch.ones_like(x), do_sample=False)
    fast, general = Recorder(), Recorder()
    out = model.generate(x, streamer=fast, **kw)
    assert len(steps) == out.size(1) - x.size(1)  # every step through the fast loop
    steps.clear()
    reference = model.generate(x, streamer=general, return_dict_in_generate=True, **kw).sequences  # transformers' loop
    assert not steps
    # the two loops compute the logits differently (decode_logits, forward): each is checked against its own
    # tokens, and both decode greedily under the model's forward (a near-tie may round the other way on another CPU)
    for recorder, sequence in ((fast, out), (general, reference)):
        calls = recorder.calls
        assert len(calls) == sequence.size(1) - x.size(1) + 2 and calls[-1] == "end"
        assert calls[0].shape == x.shape and all(c.shape == (1,) and c.dtype == torch.long for c in calls[1:-1])
        assert torch.equal(torch.cat([calls[0][0], *calls[1:-1]]), sequence[0])  # what was streamed is what returned
        assert_greedy_sequence(sequence, x.size(1), model)

    tokenizer = char_tokenizer([chr(c) for c in range(32, 126)], model_max_length=32)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(target=model.generate, args=(x,), kwargs=dict(streamer=streamer, **kw))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text == tokenizer.decode(out[0, x.size(1):])

def test_int8_weights_stay_close_and_generate():
    from nanogpt_hf.quantize import Int8Linear, quantize_int8

    model = tiny_model(vocab_size=96, bias=True)
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        reference = model(x).logits
        quantized = quantize_int8(tiny_model(vocab_size=96, bias=True))
        logits = quantized(x).logits
    assert isinstance(quantized.lm_head, Int8Linear) and type(quantized.transformer.wte) is torch.nn.Embedding
    assert (logits - reference).abs().max() < 0.02 * reference.abs().max()
    assert quantized.generate(x, max_new_tokens=8, do_sample=False).shape == (2, 20)


def test_hf_generation_modes_work(tiny):
    x = torch.randint(0, 96, (2, 4))
    torch.manual_seed(0)
    assert tiny.generate(x, max_new_tokens=8, do_sample=True, top_p=0.9, top_k=20, temperature=0.7).shape == (2, 12)
    assert tiny.generate(x, max_new_tokens=8, num_beams=3, do_sample=False).shape == (2, 12)


def _nanogpt_reference_generate(model_fn, idx, max_new_tokens, block_size, temperature=1.0, top_k=None):
    """nanoGPT's generate loop, verbatim, over any logits function (here transformers' GPT2LMHeadModel)."""
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
        logits = model_fn(idx_cond)[:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("Inf")
        probs = F.softmax(logits, dim=-1)
        idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
    return idx


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=0.8, top_k=10)])
def test_seed_generate_samples_like_nanogpt_past_block_size(tiny, kwargs):
    gpt2 = tiny.to_gpt2().eval()
    x = torch.randint(0, 96, (2, 3))
    torch.manual_seed(123)
    ours = tiny.generate(x, 50, **kwargs)  # 53 tokens > block_size 32: the context is cropped
    torch.manual_seed(123)
    with torch.no_grad():
        ref = _nanogpt_reference_generate(lambda i: gpt2(i).logits, x, 50, 32, **kwargs)
    assert ours.shape == (2, 53)
    assert torch.equal(ours, ref)


def test_seed_predict_api(tiny):
    x = torch.randint(0, 96, (2, 10))
    full = tiny.predict(x, targets=True)
    last = tiny.predict(x, targets=False)
    assert full.shape == (2, 10, 96) and last.shape == (2, 1, 96)
    assert torch.allclose(full[:, -1:], last, atol=1e-6)
    logits, loss = tiny.predict(x[:, :-1], x[:, 1:])
    expected = F.cross_entropy(logits.reshape(-1, 96), x[:, 1:].reshape(-1))
    assert torch.allclose(loss, expected)
    # HF labels are shifted inside: the same loss from labels=input_ids over the same targets
    hf_loss = tiny(x, labels=x).loss
    ref = F.cross_entropy(tiny(x).logits[:, :-1].reshape(-1, 96), x[:, 1:].reshape(-1))
    assert torch.allclose(hf_loss, ref, atol=1e-6)


def test_logits_to_keep(tiny):
    x = torch.randint(0, 96, (2, 10))
    full = tiny(x).logits
    assert torch.allclose(tiny(x, logits_to_keep=3).logits, full[:, -3:], atol=1e-6)
    assert torch.allclose(tiny(x, logits_to_keep=torch.tensor([0, 4])).logits, full[:, [0, 4]], atol=1e-6)


def test_errors_for_too_long_and_out_of_vocab_inputs(tiny):
    with pytest.raises(ValueError, match="block size is only 32"):
        tiny(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\)"):
        tiny(torch.tensor([[1, 2, 96]]))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\)"):  # the same in training mode
        tiny.train()(torch.tensor([[1, 2, 96]]))
    tiny.eval()
    with pytest.raises(ValueError, match="temperature"):
        tiny.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0.0)


def test_crop_block_size_and_num_params(tiny):
    n_before = tiny.get_num_params()
    assert tiny.get_num_params(non_embedding=False) - n_before == 32 * 32
    x = torch.randint(0, 96, (1, 16))
    before = tiny(x).logits
    tiny.crop_block_size(16)
    assert tiny.config.block_size == 16 and tiny.transformer.wpe.weight.shape == (16, 32)
    assert torch.allclose(tiny(x).logits, before, atol=1e-6)
    with pytest.raises(ValueError, match="block size is only 16"):
        tiny(torch.zeros(1, 17, dtype=torch.long))
    # PaLM/nanoGPT FLOP count: 6N + 12 L H Q T
    assert tiny.flops_per_token(16) == 6 * tiny.get_num_params() + 12 * 2 * 2 * 16 * 16


def test_training_step_and_dropout(tiny):
    model = tiny_model(dropout=0.1).train()
    x = torch.randint(0, 96, (4, 32))
    out = model(x, labels=x)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert out.cache is None if hasattr(out, "cache") else out.past_key_values is None
    # dropout is active in training (two passes differ) and off in eval (two passes agree, equal to dropout=0)
    with torch.no_grad():
        assert not torch.equal(model(x).logits, model(x).logits)
        model.eval()
        assert torch.equal(model(x).logits, model(x).logits)
        no_dropout = tiny_model(dropout=0.0)
        assert torch.allclose(model(x).logits, no_dropout(x).logits, atol=1e-6)


@pytest.mark.parametrize("bias, activation", [(True, "gelu_new"), (False, "gelu_new"), (False, "gelu")])
def test_gradients_equal_gpt2lmheadmodel(bias, activation):
    """Backward too: the same loss gives the same gradients as transformers' GPT-2 (Conv1D weights transposed)."""
    ours = tiny_model(bias=bias, activation_function=activation).train()
    gpt2 = ours.to_gpt2().train()
    x = torch.randint(0, 96, (3, 32))
    ours(x, labels=x).loss.backward()
    gpt2(input_ids=x, labels=x).loss.backward()
    theirs = dict(gpt2.named_parameters())
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    for name, p in ours.named_parameters():
        ref = theirs[name].grad
        ref = ref.t() if name.endswith(conv1d) else ref
        assert torch.allclose(p.grad, ref, atol=1e-6), name
