"""nanogpt-bench: speed of our model against transformers' GPT2LMHeadModel of the same shape, in the same run.

    nanogpt-bench                                  # training step + generation at the default shapes
    nanogpt-bench --what train --shapes quickstart,baby --compile --json bench.json
    nanogpt-bench --what train --nanogpt_dir ../nanoGPT   # also time nanoGPT's own model.py, same run
    nanogpt-bench --what prepare --corpus_mb 200   # tokenization throughput and peak memory of prepare
    nanogpt-bench --what startup                   # accelerate launch -> first training step (quickstart)
    nanogpt-bench --what quickstart                # the whole CPU quickstart run: ms/iter and val loss
    nanogpt-bench --what memory                    # memory per GPU to finetune gpt2..gpt2-xl (memory.py)
    nanogpt-bench --what speedrun [--nanogpt_dir ../nanoGPT]   # time to nanoGPT's CPU loss: its command vs the
                                                   # speedrun config, side by side (docs/speedrun.md)
    nanogpt-bench --what gpu                       # one GPU: 124M compile+bf16 MFU, pipeline, FSDP, speedrun steps,
                                                   # generation (at most ~8 minutes; a CPU machine: one error line)

Every figure is the median of --repeats timed runs after --warmup untimed ones; ours and the references are
interleaved run by run, so a machine whose speed drifts affects all alike. References: transformers'
GPT2LMHeadModel as GPT-2 defines it (biases, tanh GELU), and with --nanogpt_dir the model.py of a nanoGPT clone
(its defaults: no biases, exact GELU). Ours runs with the trainer's defaults (no biases, exact GELU, fused
AdamW). The trainer's CPU allocator setting is process-wide, so all models here run with it. MFU uses
nanoGPT's FLOP count (6N + 12LHQT per token) against the peak: a matmul rate measured in the same run on CPU,
the data-sheet bf16 peak on known GPUs, or --peak-flops.
"""

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from .errors import UserError, cli_main
from .run_dir import RunDir
from .hardware import keep_freed_memory_mapped, measured_matmul_flops, measured_read_bandwidth, peak_flops, resolve_device

__all__ = ["SHAPES", "main", "bench_train", "bench_generate"]

# named shapes: (n_layer, n_head, n_embd, block_size, batch_size, vocab_size)
WHATS = ("train", "generate", "prepare", "startup", "quickstart", "memory", "speedrun", "gpu")

# nanoGPT's documented CPU command for the baby GPT (README, "I only have a macbook"), flags after the config file
NANOGPT_CPU_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                     "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                     "--lr_decay_iters=2000", "--dropout=0.0"]

SHAPES = {
    "quickstart": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65),  # nanoGPT CPU
    "baby": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, vocab_size=50304),  # baby GPT, BPE
    "124M": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=4, vocab_size=50304),  # GPT-2 small
}


def _models(shape, device, same_function=False):
    """Ours as the trainer builds it (its defaults: no biases, nanoGPT's exact GELU) and transformers'
    GPT2LMHeadModel of the same shape as GPT-2 defines it (biases, tanh GELU), from the same initial weights.
    same_function=True: ours in GPT-2's form too (biases, tanh GELU), so the two compute the same function and
    decoding gives the same tokens."""
    from .config import TrainConfig
    from .configuration_nanogpt import NanoGPTConfig
    from .modeling_nanogpt import NanoGPTForCausalLM

    def build(**kw):
        torch.manual_seed(0)
        return NanoGPTForCausalLM(NanoGPTConfig(
            vocab_size=shape["vocab_size"], block_size=shape["block_size"], n_layer=shape["n_layer"],
            n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0, **kw))

    defaults = TrainConfig()
    ours = (build(bias=True, activation_function="gelu_new") if same_function else
            build(bias=defaults.bias, activation_function=defaults.activation_function))
    gpt2 = build(bias=True, activation_function="gelu_new").to_gpt2()
    return ours.to(device), gpt2.to(device)


def _nanogpt_model(nanogpt_dir, shape, device):
    """nanoGPT's own GPT from the model.py of a nanoGPT checkout, with nanoGPT's defaults (bias=False)."""
    import importlib.util

    path = os.path.join(nanogpt_dir, "model.py")
    if not os.path.isfile(path):
        raise UserError(f"--nanogpt_dir: {path} does not exist; point it at a clone of karpathy/nanoGPT")
    spec = importlib.util.spec_from_file_location("nanogpt_reference_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    config = module.GPTConfig(vocab_size=shape["vocab_size"], block_size=shape["block_size"], n_layer=shape["n_layer"],
                              n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0, bias=False)
    with contextlib.redirect_stdout(None):  # it prints its parameter count
        return module.GPT(config).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _interleaved(fns, device, warmup, repeats):
    """{name: [seconds per run]}: every function runs once per round, in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return times


# ------------------------------------------------------------------------------------------ training step
# the loss of each model as its own trainer computes it, from inputs x and next tokens y (nanoGPT's get_batch)
LOSSES = {
    "nanogpt_hf": lambda m, x, y: m(x, shift_labels=y, use_cache=False).loss,
    "GPT2LMHeadModel": lambda m, x, y: m(input_ids=x, labels=x, use_cache=False).loss,  # shifts inside
    "nanoGPT": lambda m, x, y: m(x, y)[1],
}


def _train_step_fn(model, name, shape, device, autocast_dtype, fused):
    B, T, V = shape["batch_size"], shape["block_size"], shape["vocab_size"]
    g = torch.Generator().manual_seed(0)
    data = torch.randint(V, (B, T + 1), generator=g).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    params = [p for p in model.parameters()]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=True) if fused else torch.optim.AdamW(groups, lr=1e-4)
    model.train()
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    loss_fn = LOSSES[name]

    def step():
        with ctx:
            loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(shape_name, device, peak, warmup=2, repeats=5, compile_=False, dtype="float32", nanogpt_dir=None):
    shape = SHAPES[shape_name]
    autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    models = dict(zip(("nanogpt_hf", "GPT2LMHeadModel"), _models(shape, device)))
    if nanogpt_dir:
        models["nanoGPT"] = _nanogpt_model(nanogpt_dir, shape, device)
    flops_per_iter = models["nanogpt_hf"].flops_per_token(shape["block_size"]) * shape["batch_size"] * shape["block_size"]
    # each as its trainer runs it: ours with fused AdamW; nanoGPT's train.py fuses AdamW on CUDA only;
    # transformers' Trainer uses the plain torch AdamW
    fns = {name: _train_step_fn(torch.compile(m) if compile_ else m, name, shape, device, autocast_dtype,
                                fused=name == "nanogpt_hf" or (name == "nanoGPT" and device.type == "cuda"))
           for name, m in models.items()}
    times = _interleaved(fns, device, warmup, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = shape["batch_size"] * shape["block_size"]
    return {
        "what": "train_step", "shape": shape_name, "dtype": dtype, "compile": compile_, **shape,
        "ms_per_step": {k: v * 1000 for k, v in med.items()},
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "mfu": {k: flops_per_iter / v / peak for k, v in med.items()},
        **{f"speedup_vs_{k}": v / med["nanogpt_hf"] for k, v in med.items() if k != "nanogpt_hf"},
    }


# ------------------------------------------------------------------------------------------ generation
def _tokenizer_for(vocab_size, block_size):
    """A real tokenizer of the shape's vocabulary, for the pipeline path: GPT-2 BPE, or a character vocabulary."""
    from .tokenization import ASSETS, char_tokenizer, gpt2_hf_tokenizer

    if vocab_size > 50000:
        return gpt2_hf_tokenizer(block_size)
    text = open(os.path.join(ASSETS, "tinyshakespeare", "input.txt"), encoding="utf-8").read()
    return char_tokenizer(sorted(set(text))[: vocab_size - 2], model_max_length=block_size)


@torch.no_grad()
def bench_generate(device, shape_name="baby", prompt_len=16, new_tokens=256, warmup=1, repeats=3):
    """Batch-1 greedy decoding of new_tokens after a prompt_len prompt, through every path users call, against
    transformers' GPT2LMHeadModel.generate on identical weights (both in GPT-2's form: biases, tanh GELU), interleaved
    run by run. The fp32 paths, GPT2LMHeadModel's included, must give the same tokens; int8 (nanogpt-sample
    --quantize int8) is reported beside. Each path's tokens/s is set against the bound of this machine's read
    bandwidth (measured) over the bytes a token reads."""
    import copy

    from transformers import pipeline

    from .quantize import int8_available, quantize_int8
    from .sample import sample_tokens

    shape = dict(SHAPES[shape_name], block_size=1024)
    ours, ref = _models(shape, device, same_function=True)
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
    if device.type == "cpu" and int8_available():  # nanogpt-sample --quantize int8; quantize_int8(model) elsewhere
        quantized = quantize_int8(copy.deepcopy(ours))
        int8_pipe = pipeline("text-generation", model=quantized, tokenizer=tokenizer, device=device)
        fns["generate, int8 weights"] = lambda: quantized.generate(prompt, **kw)
        fns["seed API generate, int8 weights"] = lambda: quantized.generate(prompt, new_tokens, top_k=1)
        fns["nanogpt-sample loop, int8 weights"] = lambda: torch.cat(
            [prompt, *sample_tokens(quantized, prompt, new_tokens, top_k=1)], dim=1)
        fns["pipeline, int8 weights"] = lambda: int8_pipe(text, **pipe_kw)
    tokens = {name: fns[name]() for name in ("generate", "generate, static cache", "seed API generate(idx, n, top_k=1)",
                                             "nanogpt-sample loop", "GPT2LMHeadModel generate")}
    same = all(torch.equal(t, tokens["generate"]) for t in tokens.values())
    pipe_ids = [torch.tensor(fns[n]()[0]["generated_token_ids"]) for n in ("pipeline", "GPT2LMHeadModel pipeline")]
    if any(len(p) != ids.size(1) + new_tokens for p in pipe_ids):
        raise RuntimeError("a pipeline stopped before its new tokens")  # tokens/s below assumes every run made them
    times = _interleaved(fns, device, warmup, repeats)
    tps = {k: new_tokens / statistics.median(v) for k, v in times.items()}
    def reference(name):  # GPT-2 doing the same work: pipeline, static cache, sampling (seed API, nanogpt-sample)
        if "pipeline" in name:
            return tps["GPT2LMHeadModel pipeline"]
        if "static" in name:
            return tps["GPT2LMHeadModel generate, static cache"]
        if "seed API" in name or "nanogpt-sample" in name:
            return tps["GPT2LMHeadModel generate, sampling top_k=1"]
        return tps["GPT2LMHeadModel generate"]

    served = _served_tokens_per_s(ours, tokenizer, text, new_tokens, repeats) if device.type == "cpu" else None
    if served is not None:  # through HTTP, tokenization and transformers' server: beside the in-process figure
        tps["nanogpt-serve /v1/completions"] = served
    # what a token reads: every weight once (int8 where quantized) and the keys and values so far (the mean context)
    kv = 2 * shape["n_layer"] * shape["n_embd"] * 4 * (prompt_len + new_tokens / 2)
    per_token = {k: (_bytes_read_per_token(quantized) if "int8" in k else _bytes_read_per_token(ours)) + kv for k in tps}
    bandwidth = measured_read_bandwidth() if device.type == "cpu" else None
    return {"what": "generate", "shape": shape_name, "prompt_len": prompt_len, "new_tokens": new_tokens, "batch": 1,
            "tokens_per_s": tps, "vs_GPT2LMHeadModel": {k: tps[k] / reference(k) for k in tps  # the served model
                                                        if not k.startswith(("GPT2LMHeadModel", "nanogpt-serve"))},
            "bytes_per_token": per_token, "read_bandwidth": bandwidth,
            "of_bandwidth_bound": {k: tps[k] * per_token[k] / bandwidth for k in tps} if bandwidth else None,
            "same_tokens_fp32_paths": same}


def _served_tokens_per_s(model, tokenizer, prompt, new_tokens, repeats):
    """tokens/s of nanogpt-serve's /v1/completions (greedy) for the model, timed from a client on 127.0.0.1 (the
    best of `repeats` requests after one warm-up), or None where the serving extra is not installed."""
    import importlib.util
    import socket
    import urllib.request

    from .model_io import save_model_folder

    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
        return None
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        save_model_folder(model, tokenizer, os.path.join(tmp, "model"))
        env = {**os.environ, "NANOGPT_HF_CACHE": os.path.join(tmp, "cache")}
        server = subprocess.Popen([sys.executable, "-m", "nanogpt_hf.serve", os.path.join(tmp, "model"), "--port",
                                   str(port), "--device", "cpu"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 180
            while True:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("nanogpt-serve did not start")
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            (folder,) = os.listdir(os.path.join(tmp, "cache", "serve"))
            body = json.dumps({"model": os.path.join(tmp, "cache", "serve", folder), "prompt": prompt,
                               "max_tokens": new_tokens, "temperature": 0}).encode()
            best = 0.0
            for _ in range(repeats + 1):
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                t0 = time.perf_counter()
                with urllib.request.urlopen(request, timeout=600) as response:
                    made = json.loads(response.read())["usage"]["completion_tokens"]
                best = max(best, made / (time.perf_counter() - t0))
            return best
        finally:
            server.terminate()
            server.wait(timeout=30)


def _bytes_read_per_token(model):
    """The bytes of weights a batch-1 decoding step reads: every parameter and buffer once, but the embedding tables
    a step looks one row up in (wte, wpe) unless the same tensor is also the head (tied), which reads it whole."""
    names = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(t.data_ptr(), (t, []))[1].append(name)
    lookups = ("wte.weight", "wpe.weight")
    return sum(t.numel() * t.element_size() for t, tensor_names in names.values()
               if not all(n.endswith(lookups) for n in tensor_names))


# ------------------------------------------------------------------------------------------ prepare, startup
def _synthetic_corpus(path, megabytes):
    """Tiny Shakespeare paragraphs, repeated and shuffled, to `megabytes` of text."""
    import random

    from .tokenization import ASSETS

    paragraphs = open(os.path.join(ASSETS, "tinyshakespeare", "input.txt"), encoding="utf-8").read().split("\n\n")
    rng = random.Random(0)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            chunk = "\n\n".join(rng.sample(paragraphs, len(paragraphs))) + "\n\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    return written


def bench_prepare(corpus_mb=200, num_proc=2):
    """Wall time, MB/s and peak RSS of a real `nanogpt-prepare documents` run in a child process."""
    from .corpus import tokenize_batch

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        n_bytes = _synthetic_corpus(corpus, corpus_mb)
        sample = open(corpus, encoding="utf-8").read(20_000_000).split("\n\n")
        t0 = time.perf_counter()
        tokenize_batch(sample)
        raw_mb_s = sum(len(s.encode("utf-8")) for s in sample) / 1e6 / (time.perf_counter() - t0)
        cmd = [sys.executable, "-c",
               "import resource, sys, time; from nanogpt_hf.prepare import main; t = time.perf_counter();\n"
               "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
               "print('RESULT', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
               "documents", "--files", corpus, "--out_dir", os.path.join(tmp, "out"), "--num_proc", str(num_proc)]
        env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(tmp, "cache")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
        if not line:
            raise UserError(f"the prepare run failed: {proc.stderr[-500:]}")
        seconds, max_rss_kb = float(line[0].split()[1]), int(line[0].split()[2])
    return {"what": "prepare", "corpus_mb": n_bytes / 1e6, "num_proc": num_proc, "seconds": seconds,
            "end_to_end_mb_per_s": n_bytes / 1e6 / seconds, "tokenize_mb_per_s": raw_mb_s,
            "peak_rss_mb": max_rss_kb / 1024}


def _prepare_shakespeare_char(folder):
    from .prepare import prepare_shakespeare_char

    with contextlib.redirect_stdout(io.StringIO()):
        prepare_shakespeare_char(os.path.join(folder, "data"))  # the copy shipped in the package
    return os.path.join(folder, "data")


def _training_command(config, folder, data_dir, out, *overrides):
    """`python -m nanogpt_hf.train` of a shipped config into folder/out: everything it needs ships with the package,
    so this works outside a checkout too."""
    return [sys.executable, "-m", "nanogpt_hf.train", "--config", config, f"--out_dir={os.path.join(folder, out)}",
            f"--data_dir={data_dir}", *overrides]


def _launch_quickstart(folder, data_dir, *overrides, stderr=subprocess.PIPE):
    """`accelerate launch` (one CPU process) of the quickstart config into folder/out, as a Popen."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes=1", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no",
           *_training_command("train_shakespeare_char_cpu", folder, data_dir, "out", *overrides)[1:]]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True, cwd=folder)


def bench_startup():
    """Seconds from `accelerate launch` to the first logged training step of the CPU quickstart config."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "out", "log.jsonl")
        data_dir = _prepare_shakespeare_char(tmp)
        t0 = time.perf_counter()
        # stderr not piped: nothing reads it while the log is polled
        proc = _launch_quickstart(tmp, data_dir, "--max_iters=3", stderr=subprocess.DEVNULL)
        first = None
        while first is None and proc.poll() is None:
            if os.path.exists(log) and any('"train/loss"' in ln for ln in open(log)):
                first = time.perf_counter() - t0
            time.sleep(0.02)
        proc.communicate()
    if first is None:
        raise UserError("the quickstart start-up run failed")
    return {"what": "startup", "seconds_to_first_step": first}


def bench_quickstart(seed=None, iters=None):
    """The whole CPU quickstart run (train_shakespeare_char_cpu): median ms/iter and the val loss it reaches."""
    overrides = ([f"--seed={seed}"] if seed is not None else []) + \
        ([f"--max_iters={iters}", f"--lr_decay_iters={iters}"] if iters else [])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        data_dir = _prepare_shakespeare_char(tmp)
        t0 = time.perf_counter()
        proc = _launch_quickstart(tmp, data_dir, *overrides)
        _, stderr = proc.communicate()
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise UserError(f"the quickstart run failed: {stderr.strip().splitlines()[-1:]}")
        records = RunDir(out).read_log()
    steps = [r["time_ms"] for r in records if "time_ms" in r]
    final = [r for r in records if "val/loss" in r][-1]
    return {"what": "quickstart", "seconds": seconds, "iters": len(steps), "median_ms_per_iter": statistics.median(steps),
            "val_loss_iter": final["iter"], "val_loss": final["val/loss"]}


# ------------------------------------------------------------------------------------------ speedrun
EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
ITER_LINE = re.compile(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms")  # nanoGPT's line, and ours outside a terminal


def _run_timed(cmd, cwd):
    """Runs a training command; returns (seconds from process start to exit, [(seconds, iter, val estimate)] for
    each evaluation line as it appeared on stdout: how the run's loss fell over wall time, [ms of each iteration
    as the run logged it])."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    curve, step_ms = [], []

    def read_stdout():
        for line in proc.stdout:
            m = EVAL_LINE.search(line)
            if m:
                curve.append((time.perf_counter() - t0, int(m.group(1)), float(m.group(3))))
            m = ITER_LINE.search(line)
            if m and int(m.group(1)) > 0:  # iteration 0 includes the first evaluation's time in nanoGPT's log
                step_ms.append(float(m.group(2)))

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    tail = proc.stderr.read().strip().splitlines()[-1:]
    proc.wait()
    seconds = time.perf_counter() - t0
    reader.join()
    if proc.returncode != 0:
        raise UserError(f"{' '.join(cmd[:4])} ... failed: {tail}")
    return seconds, curve, step_ms


def _full_val_loss(model, data_dir):
    """The loss of a full pass over val.bin, every token predicted once (nanogpt-eval's scoring)."""
    import numpy as np

    from .evaluate import evaluate_tokens

    tokens = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    return evaluate_tokens(model.eval(), tokens, model.config.block_size, batch_size=64)["loss"]


def _nanogpt_checkpoint_model(path):
    """nanoGPT's out_dir/ckpt.pt as our model: the same parameter names; its GELU is the exact one. Loaded with
    weights_only=True (tensors and plain values only: nothing in the file can run code)."""
    from .configuration_nanogpt import NanoGPTConfig
    from .modeling_nanogpt import NanoGPTForCausalLM

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    args = ckpt["model_args"]
    model = NanoGPTForCausalLM(NanoGPTConfig(activation_function="gelu", **{k: args[k] for k in (
        "n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")}))
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state, strict=False)  # lm_head.weight is tied to wte in both
    return model


def _nanogpt_data(folder, data_dir):
    """nanoGPT's data/shakespeare_char layout under folder, from our prepared folder: the same bins, and the meta.pkl
    nanoGPT's train.py reads its vocabulary size from (written for it; nothing here reads a pickle)."""
    import pickle

    target = os.path.join(folder, "data", "shakespeare_char")
    os.makedirs(target, exist_ok=True)
    for name in ("train.bin", "val.bin"):
        os.link(os.path.join(data_dir, name), os.path.join(target, name))
    meta = json.load(open(os.path.join(data_dir, "meta.json"), encoding="utf-8"))
    itos = {int(i): ch for i, ch in meta["itos"].items()}
    with open(os.path.join(target, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": meta["vocab_size"], "itos": itos, "stoi": {ch: i for i, ch in itos.items()}}, f)


def _classic_run(folder, data_dir, nanogpt_dir, extra=()):
    """nanoGPT's CPU command: its own train.py from a checkout, else our classic recipe with nanoGPT's settings
    (train_shakespeare_char_cpu with learning_rate 1e-3, min_lr 1e-4: nanoGPT's command exactly)."""
    if nanogpt_dir:
        if not os.path.isfile(os.path.join(nanogpt_dir, "train.py")):
            raise UserError(f"--nanogpt_dir: {nanogpt_dir}/train.py does not exist; point it at a clone of karpathy/nanoGPT")
        _nanogpt_data(folder, data_dir)
        # its train.py execs ./configurator.py (its command-line parser) from the working directory
        os.symlink(os.path.join(os.path.abspath(nanogpt_dir), "configurator.py"), os.path.join(folder, "configurator.py"))
        out = os.path.join(folder, "nanogpt-out")
        cmd = [sys.executable, os.path.join(nanogpt_dir, "train.py"),
               os.path.join(nanogpt_dir, "config", "train_shakespeare_char.py"), *NANOGPT_CPU_FLAGS, f"--out_dir={out}"]
        seconds, curve, step_ms = _run_timed(cmd, folder)  # it reads data/shakespeare_char under its working directory
        return "nanoGPT train.py", seconds, curve, step_ms, _nanogpt_checkpoint_model(os.path.join(out, "ckpt.pt"))
    from .modeling_nanogpt import NanoGPTForCausalLM

    seconds, curve, step_ms = _run_timed(_training_command("train_shakespeare_char_cpu", folder, data_dir, "classic",
                                                           "--learning_rate=1e-3", "--min_lr=1e-4", *extra), folder)
    return "classic recipe (nanoGPT's settings)", seconds, curve, step_ms, NanoGPTForCausalLM.from_pretrained(
        os.path.join(folder, "classic"))


def bench_speedrun(nanogpt_dir=None, config="speedrun_shakespeare_char_cpu", extra=()):
    """nanoGPT's documented CPU command and the speedrun config, one after the other in this run, each timed from
    process start to the finished model and scored by a full pass over the val split. The target is the classic
    run's loss; the speedrun's time counts only if it reaches it. extra: overrides for both of our runs (tests
    shrink them)."""
    from .modeling_nanogpt import NanoGPTForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = _prepare_shakespeare_char(tmp)
        name, classic_s, classic_curve, classic_ms, classic_model = _classic_run(tmp, data_dir, nanogpt_dir, extra)
        target = _full_val_loss(classic_model, data_dir)
        speed_s, speed_curve, speed_ms = _run_timed(_training_command(config, tmp, data_dir, "speedrun", *extra), tmp)
        speed_model = NanoGPTForCausalLM.from_pretrained(os.path.join(tmp, "speedrun"))
        speed_loss = _full_val_loss(speed_model, data_dir)
        startup = [ln for ln in open(os.path.join(tmp, "speedrun", "train_config.yaml")) if "muon_ns_dtype" in ln]
    # the classic run at the speedrun's wall time: its last evaluation by then (its own val estimate)
    at_equal_time = [(t, it, loss) for t, it, loss in classic_curve if t <= speed_s]
    median = lambda ms: statistics.median(ms) if ms else None  # noqa: E731
    return {"what": "speedrun", "classic": name, "config": config, "target_val_loss": target,
            "classic_seconds": classic_s, "classic_params": classic_model.num_parameters(),
            "classic_ms_per_iter": median(classic_ms), "classic_iters": classic_curve[-1][1] if classic_curve else None,
            "speedrun_seconds": speed_s, "speedrun_val_loss": speed_loss, "speedrun_params": speed_model.num_parameters(),
            "speedrun_ms_per_iter": median(speed_ms), "speedrun_iters": speed_curve[-1][1] if speed_curve else None,
            "muon_ns_dtype": startup[0].split(":")[1].strip() if startup else None,
            "reached": speed_loss <= target, "time_ratio": speed_s / classic_s,
            "classic_at_equal_time": at_equal_time[-1] if at_equal_time else None}


# ------------------------------------------------------------------------------------------ GPU proof
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a checkout: accelerate_configs/ is there
GPU_RUN = dict(train=["--config", "train_gpt2", "--dtype=bfloat16", "--compile=true", "--max_iters=40",
                      "--eval_interval=40", "--eval_iters=10", "--log_interval=1", "--warmup_iters=5",
                      "--gradient_accumulation_steps=1", "--batch_size=16", "--wandb_log=false"],
               fsdp=["--config", "finetune_shakespeare", "--init_from=scratch", "--n_layer=12", "--n_head=12",
                     "--n_embd=768", "--block_size=1024", "--bias=false", "--dtype=bfloat16", "--batch_size=8",
                     "--gradient_accumulation_steps=2", "--eval_interval=10", "--eval_iters=5",
                     "--always_save_checkpoint=true"],
               speedrun=["--config", "speedrun_gpt2", "--max_iters=20", "--eval_interval=20", "--eval_iters=5",
                         "--log_interval=1", "--gradient_accumulation_steps=1", "--batch_size=16", "--wandb_log=false"],
               shape="124M", fsdp_iters=(10, 20), new_tokens=256)


def _step_figures(out, skip=5):
    """(median ms/iter, tokens/s, MFU or None) of a run's journal, past its first `skip` steps (compilation)."""
    records = [r for r in RunDir(out).read_log() if "time_ms" in r][skip:]
    if not records:
        return None, None, None
    ms = statistics.median(r["time_ms"] for r in records)
    mfu = records[-1].get("mfu")
    return ms, statistics.median(r["tokens_per_s"] for r in records), mfu


GPU_STEP_TIMEOUT_S = 300  # one step of the GPU proof: a hang must not spend a lent GPU's whole budget


def _checked(cmd, cwd, env=None, timeout=GPU_STEP_TIMEOUT_S):
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise UserError(f"{' '.join(cmd[:6])} ... did not finish in {timeout} s (hung?); its last output: "
                        f"{tail.strip()[-300:] or 'none'}") from e
    if proc.returncode != 0:
        raise UserError(f"{' '.join(cmd[:6])} ... failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return proc


def gpu_proof(device, run=None, env=None):
    """The GPU path through the trainer's own loop, in one run: the 124M model in bf16 with torch.compile (ms/iter,
    tokens/s, MFU against the device's dense bf16 peak), its checkpoint loaded back and sampled through `pipeline`,
    accelerate_configs/fsdp.yaml on one process (train, evaluate, checkpoint, resume), a few steps of speedrun_gpt2,
    and cached generation against GPT2LMHeadModel. `run` shrinks it (tests exercise the same code on a CPU)."""
    from transformers import pipeline

    from .prepare import prepare_shakespeare

    run = {**GPU_RUN, **(run or {})}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        with contextlib.redirect_stdout(io.StringIO()):
            prepare_shakespeare(data)  # shipped Tiny Shakespeare, GPT-2 BPE
        out = os.path.join(tmp, "train")
        t0 = time.perf_counter()
        _checked([sys.executable, "-m", "nanogpt_hf.train", *run["train"], f"--data_dir={data}", f"--out_dir={out}"],
                 tmp, env)
        ms, tps, mfu = _step_figures(out)
        rows.append(("train (compile, bf16)", f"{ms:.1f} ms/iter, {tps:,.0f} tok/s, MFU "
                     f"{'n/a' if mfu is None else f'{mfu * 100:.1f}%'}, {time.perf_counter() - t0:.0f} s in all"))
        pipe = pipeline("text-generation", model=out, device=device)
        text = pipe("ROMEO:", max_new_tokens=20, do_sample=False)[0]["generated_text"]
        rows.append(("checkpoint -> pipeline", f"loaded and sampled: {text[:40]!r}"))

        fsdp, launch = os.path.join(tmp, "fsdp"), os.path.join(ROOT, "accelerate_configs", "fsdp.yaml")
        if not os.path.isfile(launch):
            raise UserError(f"{launch} is missing: run nanogpt-bench --what gpu from a checkout of nanogpt-hf")
        first, last = run["fsdp_iters"]
        base = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch, "--num_processes", "1",
                "-m", "nanogpt_hf.train"]
        _checked([*base, *run["fsdp"], f"--max_iters={first}", f"--data_dir={data}", f"--out_dir={fsdp}"], tmp, env)
        resumed = _checked([*base, "--init_from=resume", f"--out_dir={fsdp}", f"--max_iters={last}"], tmp, env)
        ok = "Resuming training from" in resumed.stdout and "(FSDP)" in resumed.stdout
        rows.append(("fsdp.yaml, 1 process", f"trained to {first}, resumed to {last}: "
                     f"{'ok' if ok else 'NOT resumed under FSDP'}; {_step_figures(fsdp, 2)[0]:.1f} ms/iter"))

        speed = os.path.join(tmp, "speedrun")
        _checked([sys.executable, "-m", "nanogpt_hf.train", *run["speedrun"], f"--data_dir={data}",
                  f"--out_dir={speed}"], tmp, env)
        ms, tps, mfu = _step_figures(speed)
        rows.append(("speedrun_gpt2 steps", f"{ms:.1f} ms/iter, {tps:,.0f} tok/s"))
    generated = bench_generate(torch.device(device), run["shape"], new_tokens=run["new_tokens"], repeats=3)
    t = generated["tokens_per_s"]
    rows.append(("cached generation, batch 1", f"{t['generate']:.0f} tok/s vs GPT2LMHeadModel "
                 f"{t['GPT2LMHeadModel generate']:.0f} (x{generated['vs_GPT2LMHeadModel']['generate']:.2f})"))
    return {"what": "gpu", "device": str(device), "rows": rows}


# ------------------------------------------------------------------------------------------ CLI
def _mfu_text(mfu):
    """An MFU above 100% means the peak measured at start-up was depressed (other load on the machine then)."""
    return f"{mfu * 100:5.1f}% MFU" if mfu <= 1.0 else "MFU n/a: the measured peak is unreliable (machine busy?)"


def _print(result):
    what = result["what"]
    if what == "train_step":
        ms, mfu = result["ms_per_step"], result["mfu"]
        print(f"train {result['shape']:<10} {result['dtype']:<8} compile={result['compile']!s:<5} | "
              f"ours {ms['nanogpt_hf']:8.1f} ms ({_mfu_text(mfu['nanogpt_hf'])}) | GPT2LMHeadModel "
              f"{ms['GPT2LMHeadModel']:8.1f} ms ({_mfu_text(mfu['GPT2LMHeadModel'])}) | "
              f"speed-up x{result['speedup_vs_GPT2LMHeadModel']:.2f}" +
              (f" | nanoGPT {ms['nanoGPT']:8.1f} ms, speed-up x{result['speedup_vs_nanoGPT']:.2f}" if "nanoGPT" in ms else ""))
    elif what == "generate":
        bandwidth = result.get("read_bandwidth")
        print(f"generate {result['shape']}, batch 1, {result['new_tokens']} new tokens (tokens/s; MB each token reads; "
              f"the share of the bound this machine's {bandwidth / 1e9 if bandwidth else float('nan'):.1f} GB/s read "
              f"bandwidth sets; x GPT2LMHeadModel's same path; fp32 paths give the same tokens: "
              f"{result['same_tokens_fp32_paths']})")
        for name, tps in result["tokens_per_s"].items():
            ratio = result["vs_GPT2LMHeadModel"].get(name)
            share = (result.get("of_bandwidth_bound") or {}).get(name)
            print(f"  {name:<42} {tps:8.0f} tok/s {result['bytes_per_token'][name] / 1e6:7.1f} MB"
                  + (f" {share * 100:5.1f}% of bound" if share else "") + (f"   x{ratio:.2f}" if ratio else ""))
    elif what == "prepare":
        print(f"prepare {result['corpus_mb']:.0f} MB, num_proc {result['num_proc']} | {result['seconds']:.1f} s, "
              f"{result['end_to_end_mb_per_s']:.1f} MB/s end to end, tokenizer {result['tokenize_mb_per_s']:.1f} MB/s | "
              f"peak RSS {result['peak_rss_mb']:.0f} MB")
    elif what == "quickstart":
        print(f"quickstart (CPU config): {result['iters']} iterations, median {result['median_ms_per_iter']:.1f} ms/iter, "
              f"val loss {result['val_loss']:.4f} at iteration {result['val_loss_iter']}, {result['seconds']:.0f} s in all")
    elif what == "startup":
        print(f"startup: accelerate launch -> first training step {result['seconds_to_first_step']:.2f} s")
    elif what == "speedrun":
        reached = (f"reaches it in {result['speedrun_seconds']:.1f} s: x{result['time_ratio']:.2f} of the time"
                   if result["reached"] else f"does NOT reach it (val loss {result['speedrun_val_loss']:.4f} "
                                              f"after {result['speedrun_seconds']:.1f} s)")
        print(f"speedrun: {result['classic']} ({result['classic_params'] / 1e6:.2f}M params) reaches val loss "
              f"{result['target_val_loss']:.4f} (full pass) in {result['classic_seconds']:.1f} s; {result['config']} "
              f"({result['speedrun_params'] / 1e6:.2f}M params) {reached}, val loss {result['speedrun_val_loss']:.4f}")
        ms = lambda v: "n/a" if v is None else f"{v:.1f} ms"  # noqa: E731
        print(f"speedrun: per iteration (median of the logged steps) {ms(result['classic_ms_per_iter'])} x "
              f"{result['classic_iters']} iterations against {ms(result['speedrun_ms_per_iter'])} x "
              f"{result['speedrun_iters']} (Muon's Newton-Schulz in {result['muon_ns_dtype']}); the rest of each wall "
              f"time is start-up and evaluation")
        equal = result["classic_at_equal_time"]
        if equal:
            print(f"speedrun: at {result['speedrun_seconds']:.1f} s the classic run was at iteration {equal[1]} with val "
                  f"loss {equal[2]:.4f} (its own estimate, at {equal[0]:.1f} s) against the speedrun's "
                  f"{result['speedrun_val_loss']:.4f}")
        else:
            print(f"speedrun: at {result['speedrun_seconds']:.1f} s the classic run had not evaluated yet")
    elif what == "gpu":
        print(f"GPU proof on {result['device']}:")
        for name, value in result["rows"]:
            print(f"  {name:<28} {value}")
    elif what == "memory":
        from .memory import format_memory_table

        print(format_memory_table(result["rows"]))
    elif what == "peak":
        print(f"peak {result['dtype']}: {result['flops'] / 1e9:.0f} GFLOP/s ({result['source']})")


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="nanogpt-bench", description=__doc__.splitlines()[0])
    p.add_argument("--what", default="train,generate", help="comma list of: " + ", ".join(WHATS))
    p.add_argument("--shapes", default=None, help=f"training shapes, comma list of {', '.join(SHAPES)} "
                                                   f"(default: quickstart,baby on CPU, all on GPU)")
    p.add_argument("--dtypes", default="auto", help="float32, bfloat16, float16 (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-flops", "--peak_flops", dest="peak_flops", type=float, default=None)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--corpus_mb", type=float, default=200)
    p.add_argument("--num_proc", type=int, default=2)
    p.add_argument("--seed", type=int, default=None, help="quickstart: another seed than the config's")
    p.add_argument("--quickstart_iters", type=int, default=None, help="quickstart: fewer iterations than the config's")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--profile", default=None, help="write a torch profiler trace of one training step here")
    p.add_argument("--nanogpt_dir", default=None, help="a clone of karpathy/nanoGPT: its model.py is timed too "
                                                        "(train), its train.py is the classic run (speedrun)")
    p.add_argument("--speedrun_config", default="speedrun_shakespeare_char_cpu", help="speedrun: the recipe to race")
    p.add_argument("--default_allocator", action="store_true",
                   help="CPU: leave glibc malloc as it is (as other trainers run) instead of the trainer's setting")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    whats = args.what.split(",")
    unknown = set(whats) - set(WHATS)
    if unknown:
        raise UserError(f"--what: unknown {', '.join(sorted(unknown))}; choose from {', '.join(WHATS)}")
    if "gpu" in whats and device.type != "cuda":
        raise UserError("--what gpu proves the GPU path (124M with compile in bf16, FSDP, the speedrun, generation) "
                        "and needs a CUDA GPU; none is visible here")
    shapes = (args.shapes or ("quickstart,baby" if device.type == "cpu" else ",".join(SHAPES))).split(",")
    if set(shapes) - set(SHAPES):
        raise UserError(f"--shapes: unknown {', '.join(sorted(set(shapes) - set(SHAPES)))}; choose from {', '.join(SHAPES)}")
    dtypes = (["float32"] if device.type == "cpu" else ["bfloat16"]) if args.dtypes == "auto" else args.dtypes.split(",")
    if device.type == "cpu" and not args.default_allocator:  # the trainer's setting; process-wide: all models get it
        keep_freed_memory_mapped()
    results = [{"what": "machine", "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu_allocator": "default" if args.default_allocator else "trainer's (keep_freed_memory_mapped)",
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "date": time.strftime("%Y-%m-%d")}]

    def report(result):
        results.append(result)
        _print(result)

    peaks = {}
    if "train" in whats:
        for dtype in dtypes:  # on CPU each dtype's own matmul rate (bf16 runs on AMX where the CPU has it)
            peaks[dtype] = peak_flops(device, args.peak_flops, getattr(torch, dtype))
            source = "--peak-flops" if args.peak_flops else (
                "data sheet" if device.type == "cuda" else f"measured {dtype} matmul 2048^3")
            report({"what": "peak", "dtype": dtype, "flops": peaks[dtype], "source": source})
        for shape in shapes:
            for dtype in dtypes:
                for compiled in ([False, True] if args.compile else [False]):
                    report(bench_train(shape, device, peaks[dtype], args.warmup, args.repeats, compiled, dtype,
                                       args.nanogpt_dir))
        if device.type == "cpu":  # the matmul rate drifts on a shared machine: measure it again after
            report({"what": "peak", "dtype": "float32", "flops": measured_matmul_flops(),
                    "source": "re-measured after training"})
    if "generate" in whats:
        for shape in (args.shapes or "quickstart,baby").split(","):
            report(bench_generate(device, shape, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                  warmup=1, repeats=max(1, args.repeats // 2)))
    if "prepare" in whats:
        report(bench_prepare(args.corpus_mb, args.num_proc))
    if "startup" in whats:
        report(bench_startup())
    if "quickstart" in whats:
        report(bench_quickstart(args.seed, args.quickstart_iters))
    if "speedrun" in whats:
        report(bench_speedrun(args.nanogpt_dir, args.speedrun_config))
    if "gpu" in whats:
        report(gpu_proof(device))
    if "memory" in whats:
        from .memory import memory_table

        report({"what": "memory", "rows": memory_table()})
    if args.profile:
        _profile(shapes[0], device, args.profile)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


def _profile(shape_name, device, path):
    from torch.profiler import ProfilerActivity, profile

    ours, _ = _models(SHAPES[shape_name], device)
    step = _train_step_fn(ours, "nanogpt_hf", SHAPES[shape_name], device, None, fused=True)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
    prof.export_chrome_trace(path)
    print(f"profiler trace: {path} (open in chrome://tracing or https://ui.perfetto.dev)")


if __name__ == "__main__":
    main()
