"""Decoding's matrix-vector products on a CPU (nanogpt_hf/cpu_decoding.py): the weight's row blocks multiplied in
parallel give F.linear's numbers, the decoding paths take them where they pay (and only there), and GPT2LMHeadModel's
tokens come out. Their speed is measured by `nanogpt-bench --what generate`, not here."""

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, StaticCache

from conftest import FP32_ATOL, FP32_RTOL, assert_greedy_sequence, tiny_model
from nanogpt_hf.cpu_decoding import MIN_WEIGHTS, _row_blocks_linear, decoding_linear, is_decoding_product

pytestmark = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the row-block product needs MKL")


def ops_run(fn):
    """The aten ops fn() runs, by name (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("N", [1536, 50257, 97 * 64 + 3])  # even; GPT-2's odd vocabulary; a remainder of 1
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_row_blocks_give_f_linears_numbers(two_threads, N, rows, with_bias):
    torch.manual_seed(N + rows)
    weight, x = torch.randn(N, 384) * 0.02, torch.randn(rows, 1, 384)  # GPT-2's init scale
    bias = torch.randn(N) if with_bias else None
    with torch.no_grad():
        ops = ops_run(lambda: decoding_linear(x, weight, bias))
        out = decoding_linear(x, weight, bias)
    assert ("aten::baddbmm" if with_bias else "aten::bmm") in ops  # the blocks, not F.linear's GEMV
    assert out.shape == (rows, 1, N) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=FP32_RTOL, atol=FP32_ATOL)


def test_row_blocks_of_rows_that_are_not_contiguous(two_threads):
    """The head's input at a batch's prefill: the last position of each sequence, (B, C) rows T * C apart."""
    weight, bias, hidden = torch.randn(1536, 384) * 0.02, torch.randn(1536), torch.randn(3, 5, 384)
    x = hidden[:, -1, :]
    assert not x.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(decoding_linear(x, weight, bias), F.linear(x, weight, bias),
                                   rtol=FP32_RTOL, atol=FP32_ATOL)


def test_which_products_take_the_row_blocks(two_threads):
    big, small = torch.randn(1152, 384), torch.randn(384, 128)
    assert big.numel() >= MIN_WEIGHTS > small.numel()
    one, five = torch.randn(1, 1, 384), torch.randn(5, 384)
    with torch.no_grad():
        assert is_decoding_product(one, big)
        assert not is_decoding_product(torch.randn(1, 128), small)  # from the cache F.linear is faster
        assert not is_decoding_product(five, big)  # MKL's GEMM is as fast from 8 rows
        for dtype in (torch.float64, torch.bfloat16):  # fp32 only (MKL's batched GEMM path)
            assert not is_decoding_product(one.to(dtype), big.to(dtype))
    assert not is_decoding_product(one, big)  # autograd on: training's numbers stay F.linear's
    transposed = big.t().contiguous().t()  # a weight stored the other way (rows not contiguous): F.linear itself
    with torch.no_grad():
        assert torch.equal(_row_blocks_linear(one, transposed, None), F.linear(one, transposed))
    torch.set_num_threads(1)  # one thread: nothing to split, F.linear itself (bit for bit)
    with torch.no_grad():
        assert torch.equal(_row_blocks_linear(one, big, None), F.linear(one, big))


def wide_model(seed=5):
    """The smallest model whose matrices all take the row blocks: 384 wide (the 384 x 384 projection is 147k
    weights), a 512-token vocabulary, GPT-2's form so GPT2LMHeadModel computes the same function."""
    return tiny_model(seed=seed, n_embd=384, n_head=6, n_layer=2, vocab_size=512, block_size=64, bias=True,
                      activation_function="gelu_new")


def test_decoding_takes_the_row_blocks_and_gives_gpt2lmheadmodels_tokens(two_threads):
    model = wide_model()
    gpt2 = model.to_gpt2().eval()
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model.decode_logits(prompt, cache)  # the prompt: 9 rows, F.linear
        step = torch.cat([prompt, prompt[:, :1]], dim=1)
        ops = ops_run(lambda: model.decode_logits(step, cache))  # one new token: every product in row blocks
        assert "aten::baddbmm" in ops and "aten::addmm" not in ops and "aten::linear" not in ops
        ours = model.generate(prompt, **kw)
        static = model.generate(prompt, cache_implementation="static", **kw)
        seed_api = model.generate(prompt, 40, top_k=1)
    for tokens in (ours, static, seed_api):  # greedy under an independent implementation, step by step
        assert tokens.shape == (1, 49) and torch.equal(tokens[:, :9], prompt)
        assert_greedy_sequence(tokens, 9, gpt2)


def test_decoding_follows_every_change_of_the_weights(two_threads):
    """The products read the parameters as they are at each step (no copy is kept): after an optimizer step,
    load_state_dict or an in-place edit, decoding computes with the new weights, as forward does."""
    model = wide_model()
    x = torch.randint(0, 512, (2, 7))

    def both():
        with torch.no_grad():
            return model.decode_logits(x, DynamicCache(config=model.config)), model(x).logits[:, -1]

    fast, ref = both()
    torch.testing.assert_close(fast, ref, rtol=FP32_RTOL, atol=FP32_ATOL)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(x, labels=x).loss.backward()
    optimizer.step()
    after, ref_after = both()
    assert not torch.allclose(after, fast)
    torch.testing.assert_close(after, ref_after, rtol=FP32_RTOL, atol=FP32_ATOL)
    model.load_state_dict(wide_model(seed=6).state_dict())
    loaded, ref_loaded = both()
    assert not torch.allclose(loaded, after)
    torch.testing.assert_close(loaded, ref_loaded, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_a_hooked_or_wrapped_layer_is_called(two_threads):
    """accelerate's device-map and offload hooks replace a module's forward on the instance (no torch hook): the
    decoding path calls such a layer instead of reading its weight behind its back."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    model = wide_model()
    x = torch.randint(0, 512, (1, 5))
    with torch.no_grad():
        ref = model.decode_logits(x, DynamicCache(config=model.config))
        add_hook_to_module(model.lm_head, Counting())
        add_hook_to_module(model.transformer.h[0].mlp.c_fc, Counting())
        out = model.decode_logits(x, DynamicCache(config=model.config))
        model.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert Counting.calls >= 2 + 2 * 3
    torch.testing.assert_close(out, ref, rtol=FP32_RTOL, atol=FP32_ATOL)


@pytest.mark.slow
def test_under_torch_compile_the_product_stays_one_opaque_op(two_threads):
    """torch.compile (inductor) of a forward that decodes a token against a static cache: the products are the
    custom op nanogpt_hf::decoding_linear in the graph (inductor's own lowering copies the vector out of the layout
    MKL streams), no graph break (fullgraph), and the logits of eager decoding."""
    model = wide_model()
    prompt = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(2))
    graphs = []

    def recording_inductor(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graphs.append(str(gm.graph))
        return compile_fx(gm, example_inputs)

    step = torch.compile(model, fullgraph=True, backend=recording_inductor)
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=32)
        model(prompt, cache=cache, use_cache=True)
        token = prompt[:, -1:]
        position = torch.tensor([[prompt.size(1)]])
        compiled = step(token, cache=cache, position_ids=position, use_cache=True).logits[:, -1]
    with torch.no_grad():
        eager = model.decode_logits(torch.cat([prompt, token], dim=1), DynamicCache(config=model.config))
    assert graphs and all("nanogpt_hf.decoding_linear" in g for g in graphs)
    torch.testing.assert_close(compiled, eager, rtol=FP32_RTOL, atol=FP32_ATOL)


def test_on_a_cpu_generate_decodes_eagerly_whatever_compile_config_says(two_threads):
    """transformers compiles the forward by itself on GPUs (a static cache); asked to on a CPU (compile_config's
    _compile_all_devices), decoding still takes the eager fast path, which is faster there (docs/performance.md):
    nothing is compiled and the tokens are the same."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = wide_model()
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    config = CompileConfig()
    config._compile_all_devices = True
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    frames = counters["frames"]["total"]
    with torch.no_grad():
        asked = model.generate(prompt, compile_config=config, **kw)
        assert counters["frames"]["total"] == frames
        assert torch.equal(asked, model.generate(prompt, **kw))


def test_a_model_under_accelerates_cpu_offload_decodes(two_threads):
    """accelerate's cpu_offload leaves the parameters on the meta device and loads them in hooks around each
    module's forward: decoding calls the hooked modules (it read the meta weights before: 'Tensor on device meta is
    not on the expected device cpu'), with the tokens and logits of the model before offloading."""
    from accelerate import cpu_offload

    model, reference = wide_model(), wide_model()  # reference: the same weights, never offloaded
    x = torch.randint(0, 512, (1, 5))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        tokens, logits = model.generate(x, **kw), model(x).logits
        cpu_offload(model, execution_device=torch.device("cpu"))
        assert model.lm_head.weight.device.type == "meta"
        offloaded = model.generate(x, **kw)  # transformers' loop through the hooked modules: another computation
        torch.testing.assert_close(model(x).logits, logits, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert offloaded.shape == tokens.shape
    assert_greedy_sequence(offloaded, 5, reference)
