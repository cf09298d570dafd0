"""What every measurement shares: the named shapes, the models of a shape (ours and GPT2LMHeadModel, nanoGPT's
own model.py), and interleaved timing."""

import contextlib
import os
import time

import torch

from ..errors import UserError

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


def models_of_shape(shape, device, same_function=False):
    """Ours as the trainer builds it (its defaults: no biases, nanoGPT's exact GELU) and transformers'
    GPT2LMHeadModel of the same shape as GPT-2 defines it (biases, tanh GELU), from the same initial weights.
    same_function=True: ours in GPT-2's form too (biases, tanh GELU), so the two compute the same function and
    decoding gives the same tokens."""
    from ..config import TrainConfig
    from ..configuration_nanogpt import NanoGPTConfig
    from ..modeling_nanogpt import NanoGPTForCausalLM

    def build(**kw):
        torch.manual_seed(0)
        return NanoGPTForCausalLM(NanoGPTConfig(
            vocab_size=shape["vocab_size"], block_size=shape["block_size"], n_layer=shape["n_layer"],
            n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0, **kw))

    defaults = TrainConfig()
    ours = (build(bias=True, activation_function="gelu_new") if same_function else
            build(bias=defaults.bias, activation_function=defaults.activation_function))
    gpt2 = build(bias=True, activation_function="gelu_new").to_gpt2()
    gpt2.loss_type = "ForCausalLM"  # what it computes; transformers finds no loss type in the class name and warns
    return ours.to(device), gpt2.to(device)


def nanogpt_model(nanogpt_dir, shape, device):
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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns, device, warmup, repeats, before=None):
    """{name: [seconds per run]}: every function runs once per round, in turn. With before (a function called just
    before each timed run, outside its time): {name: [(seconds, what before returned)]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            ahead = before() if before else None
            seconds = timed(fn, device)
            times[name].append((seconds, ahead) if before else seconds)
    return times
