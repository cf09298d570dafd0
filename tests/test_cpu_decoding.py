"""Decoding's matrix-vector products on a CPU (nanogpt_hf/cpu_decoding.py): every candidate kernel, forced, gives
F.linear's numbers and the model's tokens; the choice between them is the fastest by timings (injected here either
way); the decoding paths take a product only where it is one. Their speed is measured by `nanogpt-bench --what
generate`, not here."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, StaticCache

from conftest import FP32_ATOL, FP32_RTOL, assert_greedy_sequence, tiny_model
from nanogpt_hf import cpu_decoding
from nanogpt_hf.cpu_decoding import KERNELS, decoding_linear, forced_kernel, is_decoding_product

# what each kernel runs, by torch's profiler: the proof that forcing it took that branch
KERNEL_OPS = {"linear": {"aten::linear"}, "mv": {"aten::mv", "aten::addmv"}, "row_blocks": {"aten::bmm", "aten::baddbmm"},
              "transposed": {"aten::mm", "aten::addmm"}}


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


@pytest.fixture
def fresh_choices():
    """No shape timed yet, and none left behind for the next test."""
    cpu_decoding.reset_choices()
    yield
    cpu_decoding.reset_choices()


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("N", [1536, 50257, 97 * 64 + 3])  # even; GPT-2's odd vocabulary; a remainder of 1
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_kernel_gives_f_linears_numbers(two_threads, kernel, N, rows, with_bias):
    torch.manual_seed(N + rows)
    weight, x = torch.randn(N, 384) * 0.02, torch.randn(rows, 1, 384)  # GPT-2's init scale
    bias = torch.randn(N) if with_bias else None
    with torch.no_grad(), forced_kernel(kernel):
        ops = ops_run(lambda: decoding_linear(x, weight, bias))
        out = decoding_linear(x, weight, bias)
    expected = KERNEL_OPS["linear"] if kernel == "mv" and rows > 1 else KERNEL_OPS[kernel]  # mv: one row only
    assert ops & expected, ops
    assert out.shape == (rows, 1, N) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=FP32_RTOL, atol=FP32_ATOL)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_every_kernel_on_rows_that_are_not_contiguous(two_threads, kernel):
    """The head's input at a batch's prefill: the last position of each sequence, (B, C) rows T * C apart."""
    weight, bias, hidden = torch.randn(1536, 384) * 0.02, torch.randn(1536), torch.randn(3, 5, 384)
    for x in (hidden[:, -1, :], hidden[:1, -1, :]):
        assert not x.is_contiguous() or x.size(0) == 1
        with torch.no_grad(), forced_kernel(kernel):
            torch.testing.assert_close(decoding_linear(x, weight, bias), F.linear(x, weight, bias),
                                       rtol=FP32_RTOL, atol=FP32_ATOL)


def test_which_products_are_decoding_products():
    weight, one, many = torch.randn(1152, 384), torch.randn(1, 1, 384), torch.randn(17, 384)
    with torch.no_grad():
        assert is_decoding_product(one, weight) and is_decoding_product(torch.randn(16, 384), weight)
        assert not is_decoding_product(many, weight)  # a GEMM: F.linear's own work
        for dtype in (torch.float64, torch.bfloat16):  # fp32 only
            assert not is_decoding_product(one.to(dtype), weight.to(dtype))
    assert not is_decoding_product(one, weight)  # autograd on: training's numbers stay F.linear's


def test_a_kernel_that_does_not_apply_is_f_linear_itself(two_threads):
    big, one = torch.randn(1152, 384), torch.randn(1, 384)
    transposed = big.t().contiguous().t()  # a weight stored the other way (rows not contiguous)
    with torch.no_grad():
        assert torch.equal(cpu_decoding._row_blocks_linear(one, transposed, None), F.linear(one, transposed))
        torch.set_num_threads(1)  # one thread: nothing to split
        assert torch.equal(cpu_decoding._row_blocks_linear(one, big, None), F.linear(one, big))
        frozen = big.clone()
        with torch.inference_mode():
            frozen = big.clone()  # an inference tensor has no version counter to follow a copy by
        assert torch.equal(cpu_decoding._transposed_linear(one, frozen, None), F.linear(one, frozen))


def inject_timings(monkeypatch, seconds):
    """cpu_decoding times each trial call with these seconds per kernel instead of the clock (the call still runs)."""
    def timed(name, x, weight, bias):
        return KERNELS[name](x, weight, bias), seconds[name]

    monkeypatch.setattr(cpu_decoding, "_timed", timed)


@pytest.mark.parametrize("order", [("linear", "mv", "row_blocks", "transposed"),
                                   ("transposed", "row_blocks", "mv", "linear"),
                                   ("row_blocks", "linear", "transposed", "mv")])
def test_the_choice_is_the_candidate_measured_fastest(two_threads, fresh_choices, monkeypatch, order):
    """Timings injected either way: the shape goes to whichever kernel timed fastest, after SAMPLES calls of each
    candidate (each a correct product), and every later call runs it."""
    inject_timings(monkeypatch, {name: 1e-3 * (1 + rank) for rank, name in enumerate(order)})
    weight, bias, x = torch.randn(1536, 384) * 0.02, torch.randn(1536), torch.randn(1, 384)
    calls = cpu_decoding.SAMPLES * len(KERNELS)
    with torch.no_grad():
        for _ in range(calls):
            torch.testing.assert_close(decoding_linear(x, weight, bias), F.linear(x, weight, bias),
                                       rtol=FP32_RTOL, atol=FP32_ATOL)
        (label, (chosen, medians)), = cpu_decoding.chosen_kernels().items()
        assert label == "1536 x 384, 1 row, bias"
        assert chosen == order[0] and medians == {name: 1e-3 * (1 + r) for r, name in enumerate(order)}
        assert ops_run(lambda: decoding_linear(x, weight, bias)) & KERNEL_OPS[order[0]]
        assert (weight in cpu_decoding._COPIES) == (order[0] == "transposed")  # a copy kept only where it is used


def test_a_candidate_within_the_timings_noise_of_f_linear_does_not_replace_it(two_threads, fresh_choices, monkeypatch):
    """mv 3% faster than F.linear (within the noise of timing decoding's calls): F.linear stays; 10% faster: mv."""
    weight, x = torch.randn(1536, 384), torch.randn(1, 384)
    for mv, chosen in ((0.97, "linear"), (0.90, "mv")):
        cpu_decoding.reset_choices()
        inject_timings(monkeypatch, {"linear": 1.0, "mv": mv, "row_blocks": 2.0, "transposed": 2.0})
        with torch.no_grad():
            for _ in range(cpu_decoding.SAMPLES * 4):
                decoding_linear(x, weight, None)
        assert [name for name, _ in cpu_decoding.chosen_kernels().values()] == [chosen]


def test_the_choice_is_per_shape_and_leaves_out_what_does_not_apply(two_threads, fresh_choices, monkeypatch):
    """Two rows: no mv candidate; the choice for one shape is not another's; a copy the memory cannot hold is not
    a candidate."""
    inject_timings(monkeypatch, {"linear": 3.0, "mv": 1.0, "row_blocks": 2.0, "transposed": 4.0})
    weight = torch.randn(1536, 384)
    monkeypatch.setattr(cpu_decoding, "_available_memory", lambda: weight.numel() * 4)  # a quarter is too little
    with torch.no_grad():
        for _ in range(cpu_decoding.SAMPLES * 4):
            decoding_linear(torch.randn(2, 384), weight, None)
            decoding_linear(torch.randn(1, 384), weight, None)
    choices = {label: (name, set(medians)) for label, (name, medians) in cpu_decoding.chosen_kernels().items()}
    assert choices == {"1536 x 384, 2 rows": ("row_blocks", {"linear", "row_blocks"}),
                       "1536 x 384, 1 row": ("mv", {"linear", "mv", "row_blocks"})}


def test_the_environment_forces_a_kernel_in_a_fresh_process():
    """NANOGPT_DECODING_KERNEL=<name> decodes every product by that kernel (the ops it runs say so); a name that
    is no kernel is one line naming the variable and the choices."""
    script = ("import torch\nfrom transformers.cache_utils import DynamicCache\nfrom conftest import tiny_model\n"
              "m = tiny_model(n_embd=384, n_head=6, n_layer=1, vocab_size=512, block_size=64)\n"
              "x = torch.randint(0, 512, (1, 5))\n"
              "with torch.no_grad():\n    c = DynamicCache(config=m.config); m.decode_logits(x, c)\n"
              "    with torch.profiler.profile() as p: m.decode_logits(torch.cat([x, x[:, :1]], 1), c)\n"
              "print(sorted({e.name for e in p.events()}))\n")
    here = os.path.dirname(os.path.abspath(__file__))
    for kernel in ("transposed",):
        env = {**os.environ, cpu_decoding.KERNEL_ENV: kernel}
        out = subprocess.run([sys.executable, "-c", script], cwd=here, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        ops = set(eval(out.stdout.strip().splitlines()[-1]))
        assert ops & KERNEL_OPS[kernel] and not ops & {"aten::linear", "aten::bmm"}, ops
    env = {**os.environ, cpu_decoding.KERNEL_ENV: "fastest"}
    out = subprocess.run([sys.executable, "-c", "import nanogpt_hf.cpu_decoding"], env=env, capture_output=True,
                         text=True)
    assert out.returncode != 0 and "NANOGPT_DECODING_KERNEL='fastest' is not a decoding kernel" in out.stderr


def wide_model(seed=5):
    """A 384-wide model (the 6L/384 shape's matrices), a 512-token vocabulary, GPT-2's form so GPT2LMHeadModel
    computes the same function."""
    return tiny_model(seed=seed, n_embd=384, n_head=6, n_layer=2, vocab_size=512, block_size=64, bias=True,
                      activation_function="gelu_new")


@pytest.mark.parametrize("kernel", [*KERNELS, "auto"])
def test_decoding_by_each_kernel_gives_the_forwards_logits_and_gpt2lmheadmodels_tokens(two_threads, fresh_choices,
                                                                                        kernel):
    model = wide_model()
    gpt2 = model.to_gpt2().eval()
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    forced = forced_kernel(kernel) if kernel != "auto" else torch.no_grad()  # auto: timed, then chosen
    with torch.no_grad(), forced:
        cache = DynamicCache(config=model.config)
        model.decode_logits(prompt, cache)  # the prompt: 9 rows
        step = torch.cat([prompt, prompt[:, :1]], dim=1)
        ops = ops_run(lambda: model.decode_logits(step, cache))  # one new token
        with torch.enable_grad():  # the forward with autograd on is F.linear throughout: the reference
            reference = model(step).logits[:, -1].detach()
        torch.testing.assert_close(model.decode_logits(step, DynamicCache(config=model.config)), reference,
                                   rtol=FP32_RTOL, atol=FP32_ATOL)
        ours = model.generate(prompt, **kw)
        static = model.generate(prompt, cache_implementation="static", **kw)
        seed_api = model.generate(prompt, 40, top_k=1)
    if kernel != "auto":
        assert ops & KERNEL_OPS[kernel], ops
    if kernel not in ("linear", "auto"):
        assert "aten::linear" not in ops
    for tokens in (ours, static, seed_api):  # greedy under an independent implementation, step by step
        assert tokens.shape == (1, 49) and torch.equal(tokens[:, :9], prompt)
        assert_greedy_sequence(tokens, 9, gpt2)
    if kernel == "auto":  # every product of a decoding step was timed and decided
        chosen = cpu_decoding.chosen_kernels()
        assert {"1152 x 384, 1 row, bias", "512 x 384, 1 row"} <= set(chosen)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_decoding_follows_every_change_of_the_weights(two_threads, kernel):
    """The products read the parameters as they are at each step (a transposed copy is made again when the weight
    changed): after an optimizer step, load_state_dict or an in-place edit, decoding computes with the new weights,
    as forward does."""
    model = wide_model()
    x = torch.randint(0, 512, (2, 7))

    def both():  # the forward with autograd on is F.linear throughout: the reference
        with torch.no_grad(), forced_kernel(kernel):
            fast = model.decode_logits(x[:1], DynamicCache(config=model.config))
        return fast, model(x[:1]).logits[:, -1].detach()

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
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    edited, ref_edited = both()
    assert not torch.allclose(edited, loaded)
    torch.testing.assert_close(edited, ref_edited, rtol=FP32_RTOL, atol=FP32_ATOL)


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
