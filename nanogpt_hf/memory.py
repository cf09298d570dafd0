"""Memory needed per GPU to finetune the GPT-2 sizes: `nanogpt-bench --what memory` prints it (docs/memory.md).

Weights, gradients and AdamW's two moments are counted from the parameters (fp32 each, also under bf16 mixed
precision, which keeps fp32 master weights and casts per operation). Activations are measured, not estimated: one
forward pass of the real model at batch 1 x 1024 runs on the meta device (shapes only, no arithmetic) while a
saved-tensors hook adds up what autograd keeps for the backward pass. The meta device runs PyTorch's math attention,
which keeps each layer's (n_head, T, T) attention probabilities; the flash kernels that SDPA picks on GPUs (and on
this CPU) keep a (n_head, T) fp32 log-sum-exp instead, and are counted so (tests/test_memory.py checks the count
against a real forward on the CPU). With activation checkpointing (the trainer's
gradient_checkpointing key) the backward pass also holds one recomputed Block, measured the same way.

Per GPU, for each launch file:
  1 GPU (single_gpu.yaml)   weights + grads + AdamW + activations
  DDP (multi_gpu.yaml)      the same + DDP's gradient buckets (one more fp32 copy of the gradients)
  FSDP on N GPUs (fsdp.yaml) (weights + grads + AdamW) / N + two Blocks unsharded (the one computing and the one
                            prefetched; their gradients too) + the embedding unit unsharded + activations
Not counted: the CUDA context (~0.5 GB), the allocator's fragmentation, and temporaries of single kernels (the
logits' softmax for the loss, up to one more logits-sized tensor).
"""

import torch

from .model_io import enable_activation_checkpointing

__all__ = ["activation_bytes", "memory_table", "format_memory_table", "launch_file"]

ADAMW_BYTES = 4 + 4 + 4 + 4  # fp32 weight, gradient, exp_avg, exp_avg_sq per parameter


def _model(config, dtype, device="meta"):
    """The model in training mode; on the meta device it has shapes and no storage (any size builds at once)."""
    from .modeling_nanogpt import NanoGPTForCausalLM

    with torch.device(device):
        return NanoGPTForCausalLM(config).to(dtype).train()


def activation_bytes(config, dtype=torch.float32, checkpointing=False, batch=1, seq=1024, device="meta",
                     fused_attention=True):
    """Bytes autograd saves for the backward pass of one forward with labels (the trainer's step), counted per
    storage (views of one tensor count once); with fused_attention, as a flash kernel keeps the attention."""
    model = _model(config, dtype, device)
    if checkpointing:
        enable_activation_checkpointing(model, {"use_reentrant": False})
    sizes = {}

    def pack(t):
        base = t if t._base is None else t._base
        nbytes = base.untyped_storage().nbytes()
        if fused_attention and base.dim() == 4 and tuple(base.shape[-2:]) == (seq, seq):
            nbytes = base.shape[:-1].numel() * 4  # a fused kernel keeps the fp32 log-sum-exp per row instead
        sizes[id(base)] = (base, nbytes)  # the tensor stays alive in `sizes`: its id stays unique
        return t

    idx = torch.zeros(batch, seq, dtype=torch.long, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, labels=idx, use_cache=False)
    return sum(n for _, n in sizes.values())


def memory_table(names=("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"), fsdp_sizes=(2, 4, 8), seq=1024):
    """One row per (model, precision, checkpointing): the parts and the total per GPU for each launch file."""
    from .configuration_nanogpt import GPT2_PRESETS, NanoGPTConfig

    rows = []
    for name in names:
        config = NanoGPTConfig(**GPT2_PRESETS[name], vocab_size=50257, block_size=1024, bias=True, dropout=0.0)
        model = _model(config, torch.float32)
        n_params = sum(p.numel() for p in model.parameters())
        block_params = sum(p.numel() for p in model.transformer.h[0].parameters())  # one FSDP unit
        static = ADAMW_BYTES * n_params
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            full = activation_bytes(config, dtype, False, seq=seq)
            unit = block_params * dtype.itemsize
            embedding = config.vocab_size * config.n_embd * dtype.itemsize
            for checkpointing in (False, True):
                acts = full
                if checkpointing:  # the saved Block inputs, plus one Block recomputed during backward
                    one_block = (full - activation_bytes(_fewer_layers(config), dtype, False, seq=seq))
                    acts = activation_bytes(config, dtype, True, seq=seq) + one_block
                per_gpu = {"1 GPU": static + acts, "DDP": static + 4 * n_params + acts}
                for n in fsdp_sizes:
                    per_gpu[f"FSDP {n}"] = static / n + 2 * 2 * unit + embedding + acts
                rows.append({"model": name, "params": n_params, "precision": precision, "checkpointing": checkpointing,
                             "weights": 4 * n_params, "gradients": 4 * n_params, "adamw": 8 * n_params,
                             "activations": acts, "per_gpu": per_gpu})
    return rows


def _fewer_layers(config):
    return config.__class__(**{**config.to_dict(), "n_layer": config.n_layer - 1})


def launch_file(row, gpu_bytes):
    """The simplest launch file whose per-GPU need fits GPUs of gpu_bytes."""
    need = row["per_gpu"]
    if need["DDP"] <= gpu_bytes:
        return "single_gpu / multi_gpu"
    fsdp = [k for k, v in need.items() if k.startswith("FSDP") and v <= gpu_bytes]
    return f"fsdp, {fsdp[0][5:]}+ GPUs" if fsdp else "no"


def format_memory_table(rows, gpu_sizes=(24e9, 40e9, 80e9)):
    gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
    columns = list(rows[0]["per_gpu"])
    head = ("| model | params | precision | act. ckpt | weights | grads | AdamW | activations (1x1024) | " +
            " | ".join(f"{c} GB/GPU" for c in columns) + " | " +
            " | ".join(f"launch file, {g / 1e9:.0f} GB GPUs" for g in gpu_sizes) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['precision']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{gb(r['weights'])} | {gb(r['gradients'])} | {gb(r['adamw'])} | {gb(r['activations'])} | " +
                     " | ".join(gb(r["per_gpu"][c]) for c in columns) + " | " +
                     " | ".join(launch_file(r, g) for g in gpu_sizes) + " |")
    return "\n".join(lines)
