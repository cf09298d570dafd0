"""The training step at a shape: ours against GPT2LMHeadModel (and nanoGPT's model.py), interleaved; a profiler
trace of one step."""

import contextlib
import statistics

import torch

from .common import SHAPES, interleaved, models_of_shape, nanogpt_model

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
    models = dict(zip(("nanogpt_hf", "GPT2LMHeadModel"), models_of_shape(shape, device)))
    if nanogpt_dir:
        models["nanoGPT"] = nanogpt_model(nanogpt_dir, shape, device)
    flops_per_iter = models["nanogpt_hf"].flops_per_token(shape["block_size"]) * shape["batch_size"] * shape["block_size"]
    # each as its trainer runs it: ours with fused AdamW; nanoGPT's train.py fuses AdamW on CUDA only;
    # transformers' Trainer uses the plain torch AdamW
    fns = {name: _train_step_fn(torch.compile(m) if compile_ else m, name, shape, device, autocast_dtype,
                                fused=name == "nanogpt_hf" or (name == "nanoGPT" and device.type == "cuda"))
           for name, m in models.items()}
    times = interleaved(fns, device, warmup, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = shape["batch_size"] * shape["block_size"]
    return {
        "what": "train_step", "shape": shape_name, "dtype": dtype, "compile": compile_, **shape,
        "ms_per_step": {k: v * 1000 for k, v in med.items()},
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "mfu": {k: flops_per_iter / v / peak for k, v in med.items()},
        **{f"speedup_vs_{k}": v / med["nanogpt_hf"] for k, v in med.items() if k != "nanogpt_hf"},
    }



def profile_step(shape_name, device, path):
    from torch.profiler import ProfilerActivity, profile

    ours, _ = models_of_shape(SHAPES[shape_name], device)
    step = _train_step_fn(ours, "nanogpt_hf", SHAPES[shape_name], device, None, fused=True)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
    prof.export_chrome_trace(path)
    print(f"profiler trace: {path} (open in chrome://tracing or https://ui.perfetto.dev)")
