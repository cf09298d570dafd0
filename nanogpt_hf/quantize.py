"""Weight-only int8 linears for CPU sampling (`nanogpt-sample --quantize int8`, `quantize_int8(model)`).

Decoding one token reads every weight once: at the 6-layer/384 BPE shape that is 120 MB in fp32, and on the
project's 2-core CPU the read is the step's cost (24.5 GB/s measured: ~5 ms a token whatever the code does). Stored
as int8 with one fp32 scale per output row, the weights are a quarter of that; PyTorch's `_weight_int8pack_mm` runs
the matmul with bf16 activations (3.1x faster than fp32 for those matrices here, with or without native bf16).
The logits move by about 1% of their range, so samples differ from the fp32 model's: an opt-in for speed, never the
default, and for inference only.
"""

import torch
import torch.nn as nn

__all__ = ["Int8Linear", "quantize_int8", "int8_available"]


def int8_available():
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times a per-row scale (symmetric, absmax / 127)."""

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale).to(x.dtype)  # (N, out)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_int8(model):
    """Replaces every Linear of a NanoGPTForCausalLM (the blocks' and the head, untied from the token embedding,
    which stays fp32 for its lookups) by an Int8Linear, in place; returns the model, in eval mode."""
    if not int8_available():
        raise RuntimeError(f"int8 weights need torch's _weight_int8pack_mm, which torch {torch.__version__} lacks")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child))
    model.config.tie_word_embeddings = False  # the head is its own (quantized) matrix now
    return model.eval().requires_grad_(False)
