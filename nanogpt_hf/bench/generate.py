"""Batch-1 decoding through every path users call, against GPT2LMHeadModel and this machine's read bandwidth,
and through nanogpt-serve's endpoint against GPT2LMHeadModel through the same server."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .common import SHAPES, interleaved, models_of_shape, timed

# the endpoint's rows: our model through nanogpt-serve, and GPT2LMHeadModel through the same server
OURS_SERVED, GPT2_SERVED = "nanogpt-serve /v1/completions", "GPT2LMHeadModel transformers serve"
# each of our fp32 paths again with the kernels' choice off (every product F.linear), run beside it
PLAIN = ", every product F.linear"
FAST_PATHS = ("generate", "generate, static cache", "seed API generate(idx, n, top_k=1)", "nanogpt-sample loop",
              "pipeline")
PLAIN_LINEAR, SERVED_LINEAR = "generate" + PLAIN, OURS_SERVED + PLAIN  # the endpoint's: NANOGPT_DECODING_KERNEL


def _tokenizer_for(vocab_size, block_size):
    """A real tokenizer of the shape's vocabulary, for the pipeline path: GPT-2 BPE, or a character vocabulary."""
    from ..tokenization import ASSETS, char_tokenizer, gpt2_hf_tokenizer

    if vocab_size > 50000:
        return gpt2_hf_tokenizer(block_size)
    text = open(os.path.join(ASSETS, "tinyshakespeare", "input.txt"), encoding="utf-8").read()
    return char_tokenizer(sorted(set(text))[: vocab_size - 2], model_max_length=block_size)


@torch.no_grad()
def bench_generate(device, shape_name="baby", prompt_len=16, new_tokens=256, warmup=1, repeats=3, compiled=False):
    """Batch-1 greedy decoding of new_tokens after a prompt_len prompt, through every path users call, against
    transformers' GPT2LMHeadModel.generate on identical weights (both in GPT-2's form: biases, tanh GELU), interleaved
    run by run. The fp32 paths, GPT2LMHeadModel's included, must give the same tokens; int8 (nanogpt-sample
    --quantize int8) is reported beside. Each path's tokens/s is set against the bound of this machine's read
    bandwidth, measured just before each run, over the bytes a token reads. compiled: also with transformers'
    compiled forward (a static cache and a compile_config, as transformers compiles on a GPU by itself)."""
    import copy

    from transformers import pipeline

    from ..cpu_decoding import chosen_kernels, forced_kernel
    from ..quantize import int8_available, quantize_int8
    from ..sample import sample_tokens

    shape = dict(SHAPES[shape_name], block_size=1024)
    ours, ref = models_of_shape(shape, device, same_function=True)
    ours.eval(), ref.eval()
    tokenizer = _tokenizer_for(shape["vocab_size"], shape["block_size"])
    prompt = torch.randint(len(tokenizer) - 2, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    text = tokenizer.decode(prompt[0])
    ids = tokenizer(text, return_tensors="pt").input_ids.to(device)  # the pipeline's prompt, re-encoded
    # no EOS token: every run makes exactly new_tokens (min_new_tokens would add two full-vocabulary logits
    # processors per token to the measurement)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    sampling = dict(kw, do_sample=True, top_k=1)  # the seed API's and nanogpt-sample's work: top-k, softmax, draw
    pipe_kw = dict(max_new_tokens=new_tokens, do_sample=False, return_tensors=True)
    pipes = {name: pipeline("text-generation", model=m, tokenizer=tokenizer, device=device) for name, m in
             (("ours", ours), ("gpt2", ref))}

    def sample_loop():
        return torch.cat([prompt, *sample_tokens(ours, prompt, new_tokens, top_k=1)], dim=1)

    fns = {
        "GPT2LMHeadModel generate": lambda: ref.generate(prompt, **kw),
        "GPT2LMHeadModel generate, sampling top_k=1": lambda: ref.generate(prompt, **sampling),
        "generate": lambda: ours.generate(prompt, **kw),
        "GPT2LMHeadModel generate, static cache": lambda: ref.generate(prompt, cache_implementation="static", **kw),
        "generate, static cache": lambda: ours.generate(prompt, cache_implementation="static", **kw),
        "seed API generate(idx, n, top_k=1)": lambda: ours.generate(prompt, new_tokens, top_k=1),
        "nanogpt-sample loop": sample_loop,
        "GPT2LMHeadModel pipeline": lambda: pipes["gpt2"](text, **pipe_kw),
        "pipeline": lambda: pipes["ours"](text, **pipe_kw),
    }
    with_plain = {}
    for name, fn in fns.items():  # each of our fp32 paths followed by its twin with the kernels' choice off
        with_plain[name] = fn
        if name in FAST_PATHS:
            with_plain[name + PLAIN] = _plain(fn, forced_kernel)
    fns = with_plain
    if compiled:
        from transformers import CompileConfig

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers compiles by itself on GPUs only
        static_compiled = dict(kw, cache_implementation="static", compile_config=compile_config)
        fns["GPT2LMHeadModel generate, static cache, compile_config"] = lambda: ref.generate(prompt, **static_compiled)
        fns["generate, static cache, compile_config"] = lambda: ours.generate(prompt, **static_compiled)
    if device.type == "cpu" and int8_available():  # nanogpt-sample --quantize int8; quantize_int8(model) elsewhere
        quantized = quantize_int8(copy.deepcopy(ours))
        int8_pipe = pipeline("text-generation", model=quantized, tokenizer=tokenizer, device=device)
        fns["generate, int8 weights"] = lambda: quantized.generate(prompt, **kw)
        fns["seed API generate, int8 weights"] = lambda: quantized.generate(prompt, new_tokens, top_k=1)
        fns["nanogpt-sample loop, int8 weights"] = lambda: torch.cat(
            [prompt, *sample_tokens(quantized, prompt, new_tokens, top_k=1)], dim=1)
        fns["pipeline, int8 weights"] = lambda: int8_pipe(text, **pipe_kw)
    greedy = ("generate", PLAIN_LINEAR, "generate, static cache", "seed API generate(idx, n, top_k=1)", "nanogpt-sample loop",
              "GPT2LMHeadModel generate", "generate, static cache, compile_config",
              "GPT2LMHeadModel generate, static cache, compile_config")
    tokens = {name: fns[name]() for name in greedy if name in fns}
    same = all(torch.equal(t, tokens["generate"]) for t in tokens.values())
    pipe_ids = [torch.tensor(fns[n]()[0]["generated_token_ids"]) for n in ("pipeline", "GPT2LMHeadModel pipeline")]
    if any(len(p) != ids.size(1) + new_tokens for p in pipe_ids):
        raise RuntimeError("a pipeline stopped before its new tokens")  # tokens/s below assumes every run made them
    # what a token reads: every weight once (int8 where quantized) and the keys and values so far (the mean context)
    kv = 2 * shape["n_layer"] * shape["n_embd"] * 4 * (prompt_len + new_tokens / 2)
    weights = _bytes_read_per_token(ours)
    if device.type == "cpu":  # each run beside the read rates of its moment: a large buffer's, the weights' size
        runs = interleaved(fns, device, warmup, repeats, before=_read_bandwidth_probe(weights))
        times = {k: [seconds for seconds, _ in v] for k, v in runs.items()}
    else:
        times = interleaved(fns, device, warmup, repeats)
    tps = {k: new_tokens / statistics.median(v) for k, v in times.items()}
    def reference(name):  # GPT-2 doing the same work: pipeline, static cache, sampling, the same server
        name = name.removesuffix(PLAIN)
        if name == OURS_SERVED:
            return tps[GPT2_SERVED]
        if "pipeline" in name:
            return tps["GPT2LMHeadModel pipeline"]
        if "compile_config" in name:
            return tps["GPT2LMHeadModel generate, static cache, compile_config"]
        if "static" in name:
            return tps["GPT2LMHeadModel generate, static cache"]
        if "seed API" in name or "nanogpt-sample" in name:
            return tps["GPT2LMHeadModel generate, sampling top_k=1"]
        return tps["GPT2LMHeadModel generate"]

    if device.type == "cpu":  # through HTTP, tokenization and transformers' server: beside the in-process figures
        tps.update(_served_tokens_per_s(ours, tokenizer, text, new_tokens, repeats))
    per_token = {k: (_bytes_read_per_token(quantized) if "int8" in k else weights) + kv for k in tps}
    bandwidth, weights_bandwidth, bound, weights_bound, draw, bound_without_draw = None, None, None, None, None, None
    if device.type == "cpu":  # each run against the read rates of its moment; the endpoint against the medians
        bandwidth = statistics.median(rates[0] for v in runs.values() for _, rates in v)
        weights_bandwidth = statistics.median(rates[1] for v in runs.values() for _, rates in v)

        def share(k, which, median):  # of the bound that read rate sets
            if k not in runs:
                return tps[k] * per_token[k] / median
            return statistics.median(new_tokens / seconds * per_token[k] / rates[which] for seconds, rates in runs[k])

        bound = {k: share(k, 0, bandwidth) for k in tps}
        weights_bound = {k: share(k, 1, weights_bandwidth) for k in tps}
        # the sampling paths draw with torch.multinomial, an exponential per vocabulary entry (the same samples as
        # nanoGPT for a seed): their share again with that draw's time taken out of each token
        draw = _draw_seconds(shape["vocab_size"], device)
        bound_without_draw = {k: statistics.median(per_token[k] / rates[0] / max(seconds / new_tokens - draw, 1e-9)
                                                   for seconds, rates in runs[k]) for k in runs if _samples(k)}
    # our fp32 decoding paths against plain F.linear decoding of the same model: what the kernels' choice gains
    vs_plain = {k: tps[k] / tps[k + PLAIN] for k in (*FAST_PATHS, OURS_SERVED) if k + PLAIN in tps}
    return {"what": "generate", "shape": shape_name, "prompt_len": prompt_len, "new_tokens": new_tokens, "batch": 1,
            "vocab_size": shape["vocab_size"],
            "tokens_per_s": tps, "vs_GPT2LMHeadModel": {k: tps[k] / reference(k) for k in tps
                                                        if not k.startswith("GPT2LMHeadModel")},
            "vs_plain_linear": vs_plain,
            "bytes_per_token": per_token, "read_bandwidth": bandwidth, "weights_read_bandwidth": weights_bandwidth,
            "of_bandwidth_bound": bound, "of_weights_bandwidth_bound": weights_bound, "draw_seconds_per_token": draw,
            "kernels": {label: {"chosen": name, "median_us": {k: v * 1e6 for k, v in medians.items()}}
                        for label, (name, medians) in chosen_kernels().items()},
            "of_bandwidth_bound_without_draw": bound_without_draw,
            "same_tokens_fp32_paths": same}


def _plain(fn, forced_kernel):
    """fn with every decoding product F.linear (the kernels' choice off)."""
    def run():
        with forced_kernel("linear"):
            return fn()
    return run


def _samples(name):
    """Whether the path draws its tokens with torch.multinomial (top_k=1: the same tokens as greedy)."""
    return "sampling" in name or "seed API" in name or "nanogpt-sample" in name


def _draw_seconds(vocab_size, device, repeats=20):
    """The median time of one torch.multinomial draw from a vocabulary's probabilities (batch 1)."""
    probs = torch.softmax(torch.randn(1, vocab_size, generator=torch.Generator().manual_seed(0)), -1).to(device)
    return statistics.median(timed(lambda: torch.multinomial(probs, 1), device) for _ in range(repeats))


def _read_bandwidth_probe(weights_bytes):
    """A function returning the machine's read rates now, bytes/s: (a 1 GiB tensor's, the DRAM rate; a tensor the
    size of the weights', read as a decode reads them: from the cache where the cache holds them), each the best of
    two sums on every thread, the smaller one warmed first. A shared machine's bandwidth moves with its neighbours'
    load (42-78 GB/s within minutes on an AMD EPYC, docs/performance.md), so the bench measures both just before
    each run. On a CPU whose cache holds the whole model (an Intel Xeon's 260 MiB L3 and the 122 MB 6L/384 model)
    only the second says how far a decode is from its limit."""
    large, sized = torch.ones((1 << 30) // 4), torch.ones(max(1, int(weights_bytes) // 4))

    def rate(t):
        return t.numel() * 4 / min(timed(t.sum, t.device) for _ in range(2))

    def rates():
        dram = rate(large)
        sized.sum()
        return dram, rate(sized)

    return rates


def _served_tokens_per_s(model, tokenizer, prompt, new_tokens, repeats):
    """tokens/s of /v1/completions (greedy) from a client on 127.0.0.1, the best of `repeats` requests after one
    warm-up, the servers asked in turn: transformers serve on the model's GPT2LMHeadModel export (the server
    decoding with GPT-2's class), nanogpt-serve on the model, and nanogpt-serve with every product F.linear
    (NANOGPT_DECODING_KERNEL=linear). {} where the serving extra is missing."""
    import importlib.util

    from ..cpu_decoding import KERNEL_ENV
    from ..export import export_gpt2
    from ..model_io import save_model_folder
    from ..serve import free_port, wait_until_serving

    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        ours, gpt2 = os.path.join(tmp, "model"), os.path.join(tmp, "gpt2")
        save_model_folder(model, tokenizer, ours)
        export_gpt2(ours, gpt2)
        serve_ours = [sys.executable, "-m", "nanogpt_hf.serve", ours]
        commands = {GPT2_SERVED: ([sys.executable, "-m", "transformers.cli.transformers", "serve", gpt2], "auto"),
                    OURS_SERVED: (serve_ours, "auto"), SERVED_LINEAR: (serve_ours, "linear")}
        servers = {}
        try:
            for name, (command, kernel) in commands.items():
                port = free_port()
                env = {**os.environ, "NANOGPT_HF_CACHE": os.path.join(tmp, "cache"), KERNEL_ENV: kernel}
                servers[name] = port, subprocess.Popen([*command, "--device", "cpu", "--port", str(port)], env=env,
                                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for port, server in servers.values():
                wait_until_serving(port, server)
            # no "model" in the request: each server is pinned to its folder
            body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0}).encode()
            best = dict.fromkeys(servers, 0.0)
            for _ in range(repeats + 1):
                for name, (port, _) in servers.items():
                    best[name] = max(best[name], _completion_tokens_per_s(port, body))
            return best
        finally:
            for _, server in servers.values():
                server.terminate()
                server.wait(timeout=30)


def _completion_tokens_per_s(port, body):
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        made = json.loads(response.read())["usage"]["completion_tokens"]
    return made / (time.perf_counter() - t0)


def _bytes_read_per_token(model):
    """The bytes of weights a batch-1 decoding step reads: every parameter and buffer once, but the embedding tables
    a step looks one row up in (wte, wpe) unless the same tensor is also the head (tied), which reads it whole."""
    names = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(t.data_ptr(), (t, []))[1].append(name)
    lookups = ("wte.weight", "wpe.weight")
    return sum(t.numel() * t.element_size() for t, tensor_names in names.values()
               if not all(n.endswith(lookups) for n in tensor_names))
