"""OpenAI GPT-2 checkpoints <-> NanoGPT state dicts.

GPT2LMHeadModel's parameter names equal nanoGPT's; only its four Conv1D weights are stored transposed
((in, out) instead of nn.Linear's (out, in)). Checkpoints in the wild come in two layouts: with the
`transformer.` prefix (GPT2LMHeadModel) and without it (GPT2Model, the original hub upload), the latter with the
old attention-mask buffers `.attn.bias` / `.attn.masked_bias`, which are not weights.

Copied next to saved models together with modeling_nanogpt.py: imports only libraries and the config file.
"""

import json
import os

import torch

from .configuration_nanogpt import ACTIVATIONS, GPT2_PRESETS, NanoGPTConfig

__all__ = ["load_gpt2_state_dict", "nanogpt_config_from_gpt2", "gpt2_to_nanogpt_state_dict", "to_gpt2_model", "non_gpt2_options"]

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # leading dot: `c_attn.bias` also ends in `attn.bias`


def hub_id(name):
    """gpt2 -> openai-community/gpt2 (the canonical repo since the hub moved OpenAI's models)."""
    return f"openai-community/{name}" if name in GPT2_PRESETS else name


def _read_gpt2_folder(folder):
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    st_path = os.path.join(folder, "model.safetensors")
    if os.path.exists(st_path):
        return config, load_file(st_path)
    bin_path = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(bin_path):
        return config, torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin in this GPT-2 folder")


def _download_gpt2(repo_id):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    folder = os.path.dirname(hf_hub_download(repo_id, "config.json"))
    try:
        hf_hub_download(repo_id, "model.safetensors")
    except EntryNotFoundError:
        hf_hub_download(repo_id, "pytorch_model.bin")
    return folder


def load_gpt2_state_dict(name_or_path):
    """(GPT-2 config dict, NanoGPT-layout state dict) of a hub id or local GPT2LMHeadModel/GPT2Model folder."""
    folder = name_or_path if os.path.isdir(name_or_path) else _download_gpt2(hub_id(name_or_path))
    config, state_dict = _read_gpt2_folder(folder)
    if config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{name_or_path}: model_type is {config.get('model_type')!r}, expected a GPT-2 checkpoint")
    return config, gpt2_to_nanogpt_state_dict(state_dict)


def gpt2_to_nanogpt_state_dict(state_dict):
    out = {}
    for key, value in state_dict.items():
        if key.endswith(MASK_BUFFERS) or key == "lm_head.weight":  # buffers; lm_head is tied to wte
            continue
        if not key.startswith("transformer."):
            key = "transformer." + key
        out[key] = value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value
    return out


def nanogpt_config_from_gpt2(gpt2_config, dropout=None, **overrides):
    activation = gpt2_config.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise ValueError(f"GPT-2 checkpoint uses activation {activation!r}; NanoGPT implements {', '.join(ACTIVATIONS)}")
    args = dict(
        vocab_size=gpt2_config["vocab_size"],
        block_size=gpt2_config.get("n_positions", gpt2_config.get("n_ctx", 1024)),
        n_layer=gpt2_config["n_layer"],
        n_head=gpt2_config["n_head"],
        n_embd=gpt2_config["n_embd"],
        bias=True,  # always True for GPT-2 checkpoints
        activation_function=activation,
        dropout=0.0 if dropout is None else dropout,
        layer_norm_epsilon=gpt2_config.get("layer_norm_epsilon", 1e-5),
        bos_token_id=gpt2_config.get("bos_token_id", 50256),
        eos_token_id=gpt2_config.get("eos_token_id", 50256),
    )
    args.update(overrides)
    return NanoGPTConfig(**args)


def non_gpt2_options(config):
    """The architecture options of config that GPT-2 does not have (an untied head it has), as `key=value`."""
    gpt2 = dict(position_embedding="learned", norm="layernorm", qk_norm=False, logit_softcap=None)
    found = [f"{k}={getattr(config, k, v)!r}" for k, v in gpt2.items() if getattr(config, k, v) != v]
    if config.activation_function == "relu2":
        found.append("activation_function='relu2'")
    return found


def to_gpt2_model(model):
    """A transformers GPT2LMHeadModel computing the same function as `model` (a NanoGPTForCausalLM). Models with
    options GPT-2 has no equivalent for (rope, rmsnorm, qk_norm, relu2, logit_softcap) raise ValueError."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    unsupported = non_gpt2_options(cfg)
    if unsupported:
        raise ValueError(f"this model uses {', '.join(unsupported)}, which transformers' GPT2LMHeadModel cannot "
                         f"compute, and no stock transformers architecture matches it: share the model folder "
                         f"itself (it loads with trust_remote_code=True)")
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.block_size,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            activation_function=cfg.activation_function,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.layer_norm_epsilon,
            bos_token_id=cfg.bos_token_id,  # None for a character model: GPT-2's 50256 would be out of its vocabulary
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
    )
    ours = model.state_dict()
    new_state = {}
    for key, target in gpt2.state_dict().items():
        if key.endswith(MASK_BUFFERS):
            new_state[key] = target
            continue
        value = ours.get(key)
        if value is None:  # a bias the bias=False model does not have: zero is the same function
            new_state[key] = torch.zeros_like(target)
        else:
            new_state[key] = value.t().contiguous() if key.endswith(CONV1D_WEIGHTS) else value.detach().clone()
    gpt2.load_state_dict(new_state, strict=True)
    if cfg.tie_word_embeddings:
        gpt2.tie_weights()
    return gpt2.to(next(model.parameters()).dtype)
