"""NanoGPT as a Hugging Face causal LM.

The architecture is nanoGPT's model.py, which is GPT-2's: pre-LayerNorm blocks, learned position embeddings,
a 4x MLP with GELU (GPT-2's tanh approximation or nanoGPT's exact one), causal self-attention through
`scaled_dot_product_attention` (flash attention where the device has it), tied input/output embeddings.
Parameter names equal GPT2LMHeadModel's, so OpenAI's checkpoints load with only the Conv1D weights transposed
(see gpt2_conversion.py).

Opt-in options of the speedrun recipes (NanoGPTConfig; the defaults are GPT-2's): rotary position embeddings
instead of the learned table, RMSNorm, QK-norm, ReLU^2, zero-initialised residual projections, a logit soft-cap
and an untied head (docs/speedrun.md measures each).

References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py
3) huggingface/transformers PyTorch implementation:
   https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
4) modded-nanogpt, the speedrun's techniques: https://github.com/KellerJordan/modded-nanogpt

This file is copied next to every saved model, so it imports only transformers, torch and the files beside it.
"""

import math
import sys
import warnings

import torch
import torch.nn as nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_nanogpt import NanoGPTConfig
from .cpu_decoding import decoding_linear, is_decoding_product
from .gpt2_conversion import load_gpt2_state_dict, nanogpt_config_from_gpt2, to_gpt2_model
from .kv_cache import append_keys_values

try:  # transformers >= 5: init helpers that skip tensors already loaded by from_pretrained
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    init = nn.init

__all__ = ["NanoGPTModel", "NanoGPTForCausalLM", "NanoGPTPreTrainedModel"]

# Where stderr is a log file or a CI (not a terminal), transformers' "Loading weights 0%...100%" bars around every
# from_pretrained are noise that a user reads every time (the README's pipeline snippet included): off, as our
# command-line tools turn them off. Loading this file (our package, or a saved folder's copy) comes before the
# weights load. In a terminal they stay.
if not (sys.stderr and sys.stderr.isatty()):
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()

# transformers 5.24 renamed the cache field of model outputs from `past_key_values` to `cache`; earlier 5.x
# (and the GPU machines' 5.17) use the old name. generate() reads the cache back from this field.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config  # read at call time: `_attn_implementation` can be switched after construction
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection; a residual projection, so GPT-2's scaled init applies (see _init_weights)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.layer_idx = layer_idx

    def forward(self, x, cache=None, attn_mask=None, output_attentions=False, rotary=None):
        """attn_mask: None (causal, or nothing to mask for one query over a full cache), a boolean mask
        (B or 1, 1, T, S) where True means "may attend", or an additive float mask of that shape.
        rotary: (cos, sin) of the positions, each (B or 1, 1, T, hs / 2), with position_embedding="rope"."""
        eager = output_attentions or self.config._attn_implementation == "eager"
        y, att = _self_attention(self, x, cache, attn_mask, rotary, self.config.qk_norm, eager)
        return self.resid_dropout(y), att

    def _eager_attention(self, q, k, v, attn_mask, is_causal):
        """nanoGPT's manual implementation of attention; it also returns the attention weights (B, nh, T, S)."""
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
        if is_causal:
            attn_mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()  # (T, S)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            att = att.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:
            att = att + attn_mask
        att = F.softmax(att.float(), dim=-1).to(q.dtype)
        att = self.attn_dropout(att)
        return att @ v, att  # (B, nh, T, hs), (B, nh, T, S)


def _self_attention(attn, x, cache, attn_mask, rotary, qk_norm, eager):
    """One block's attention on its normed input x (B, T, C), before the residual dropout: (y, weights or None).
    The module's forward and the inference fast path (_blocks_fast) both run this."""
    B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
    nh = attn.n_head
    hs = C // nh
    q, k, v = _linear(attn.c_attn, x).split(C, dim=2)
    k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    if qk_norm:  # QK-norm (Dehghani et al. 2023; modded-nanogpt): bounded attention logits
        q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))
    if rotary is not None:
        q, k = _rotate(q, *rotary), _rotate(k, *rotary)
    if cache is not None:
        # the cache returns all keys/values seen so far: (B, nh, S, hs), S = past + T (a static cache: its size)
        k, v = append_keys_values(cache, k, v, attn.layer_idx, attn.config.block_size)
    # Without a mask, a causal mask is only needed when the queries start at the first key; a single
    # new query (cached decoding) sees every key.
    is_causal = attn_mask is None and T > 1
    if eager:
        y, att = attn._eager_attention(q, k, v, attn_mask, is_causal)
    else:  # flash attention where the device has it
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=attn.dropout if attn.training else 0.0, is_causal=is_causal
        )  # (B, nh, T, hs)
        att = None
    y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble all head outputs side by side
    return _linear(attn.c_proj, y), att


def _linear(module, x):
    """A Linear layer's output; a plain nn.Linear without hooks skips the module call (its Python overhead is most
    of a decoding step at small sizes). Anything else - peft's LoRA layers, quantized linears, hooks - is called."""
    if type(module) is nn.Linear and not _hooked(module):
        weight, bias = module.weight, module.bias
        # a CPU's decoding step: by the kernel measured fastest for its shape on this machine (cpu_decoding.py)
        if is_decoding_product(x, weight):
            return decoding_linear(x, weight, bias)
        return F.linear(x, weight, bias)
    return module(x)


def _hooked(module):
    """Whether calling the module does more than its forward: torch's hooks, or a forward replaced on the instance
    (accelerate's device-map and offload hooks wrap `module.forward` that way, without a torch hook)."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in module.__dict__


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)
        # GPT-2 uses the tanh approximation of GELU ("gelu_new"), nanoGPT the exact one (nn.GELU()). Both run as
        # one PyTorch kernel (transformers' NewGELUActivation is five); on CPU the exact one is several times faster
        # (docs/performance.md). relu2 is ReLU(x)^2 (Primer, So et al. 2021; the speedrun's MLP).
        self.relu2 = config.activation_function == "relu2"
        self.gelu_approximate = "none" if config.activation_function == "gelu" else "tanh"

    def forward(self, x):
        return self.dropout(_feed_forward(self, x))


def _feed_forward(mlp, x):
    """The MLP before its dropout (the module's forward and the inference fast path both run this)."""
    h = _linear(mlp.c_fc, x)
    h = F.relu(h).square() if mlp.relu2 else F.gelu(h, approximate=mlp.gelu_approximate)
    return _linear(mlp.c_proj, h)


def _norm(config):
    """GPT-2's LayerNorm, or RMSNorm (norm="rmsnorm": no mean, no bias; Zhang & Sennrich 2019)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.layer_norm_epsilon)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)


def _apply_norm(norm, x):
    """A LayerNorm or RMSNorm module's function, without the module call (the inference fast path)."""
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _rotary(position_ids, head_size, theta, dtype):
    """cos and sin of rotary embeddings (RoFormer, Su et al. 2021) for positions (T,) or (B, T): each
    (B or 1, 1, T, hs / 2). Computed per call from the positions, so there is no buffer to save or load."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, device=position_ids.device, dtype=torch.float32) / head_size)
    angles = position_ids.float()[..., None] * inv_freq  # (T, hs / 2) or (B, T, hs / 2)
    angles = angles.view(-1, 1, *angles.shape[-2:])  # (B or 1, 1, T, hs / 2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x, cos, sin):
    """Rotates each pair (x1[i], x2[i]) of the head's two halves by the position's angle: (B, nh, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs / 2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Block(GradientCheckpointingLayer):
    """A pre-LayerNorm transformer block. Under `gradient_checkpointing_enable()` transformers recomputes its
    activations in the backward pass instead of storing them (GradientCheckpointingLayer)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, output_attentions=False, rotary=None):
        y, att = self.attn(self.ln_1(x), cache, attn_mask, output_attentions, rotary)
        x = x + y
        x = x + self.mlp(self.ln_2(x))
        return x, att


class NanoGPTPreTrainedModel(PreTrainedModel):
    config_class = NanoGPTConfig
    config: NanoGPTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _can_compile_fullgraph = True

    def _init_weights(self, module):
        """GPT-2 init: N(0, 0.02) everywhere, zero biases, residual projections scaled by 1/sqrt(2 * n_layer).

        The scaled init is keyed on the Linear itself: transformers calls _init_weights only on modules that own
        parameters, so a check on the attention/MLP wrapper would silently never run.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_projection", False):
                # GPT-2 paper: scale residual weights by 1/sqrt(N), N the number of residual layers (2 per block)
                std = std / math.sqrt(2 * self.config.n_layer)
            if getattr(module, "residual_projection", False) and self.config.zero_init_residual:
                init.zeros_(module.weight)  # each block starts as the identity (modded-nanogpt, ReZero)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)

    @classmethod
    def _can_set_attn_implementation(cls):
        # transformers guesses this from the source (an attention class calling its interface registry); ours reads
        # config._attn_implementation at every call, so set_attn_implementation("eager" | "sdpa") takes effect
        return True

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A saved causal LM also names the base model in auto_map, so `AutoModel.from_pretrained(folder,
        # trust_remote_code=True)` (feature extraction) works in a fresh environment too.
        if getattr(self, "_auto_class", None) is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": f"{module}.NanoGPTModel"}
        return super().save_pretrained(save_directory, *args, **kwargs)


class NanoGPTModel(NanoGPTPreTrainedModel):
    """The transformer: token and position embeddings, the blocks, the final LayerNorm. Returns hidden states."""

    def __init__(self, config: NanoGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        # learned absolute positions (GPT-2), or none here: rotary embeddings act inside attention
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position_embedding == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = _norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        """Returns a `BaseModelOutputWithPast` (a tuple with return_dict=False).

        attention_mask: 2-D (B, past + T) with 0 at padding, or a ready 4-D mask (B, 1, T, S) as generate() makes
            for a static cache (boolean: True attends; float: added to the scores).
        hidden_states (output_hidden_states=True): the input of every block, then the final LayerNorm's output.
        """
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("NanoGPTModel.forward needs exactly one of input_ids and inputs_embeds")
        if past_key_values is not None and _CACHE_FIELD == "cache":  # the name older transformers pass
            warnings.warn("`past_key_values` is deprecated in this transformers version; pass `cache`", FutureWarning)
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = cfg.use_cache and not self.training  # only the default depends on training
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False  # recomputing a block in the backward pass would append to the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        elif not use_cache:
            cache = None

        B, T = (input_ids if input_ids is not None else inputs_embeds[..., 0]).shape
        past = cache.get_seq_length() if cache is not None else 0
        self._check_length(T, past)
        if attention_mask is not None and attention_mask.dim() == 2 and not torch.compiler.is_compiling() and bool(
            attention_mask.all()
        ):
            attention_mask = None  # no padding: the cheaper paths of the helpers below (one host sync; not compiled)
        if inputs_embeds is None:
            inputs_embeds = self._embed_tokens(input_ids, past)  # token embeddings of shape (B, T, n_embd)
        attn_mask = _attention_mask(attention_mask, T, past, _static_length(cache), inputs_embeds.device)
        if position_ids is None:
            position_ids = _position_ids(attention_mask, T, past, inputs_embeds.device)
        rotary = None
        if self.wpe is not None:
            pos_emb = self.wpe(position_ids)  # position embeddings of shape (T, n_embd) or (B, T, n_embd)
            x = self.drop(inputs_embeds + pos_emb)
        else:
            x = self.drop(inputs_embeds)
            rotary = _rotary(position_ids, cfg.n_embd // cfg.n_head, cfg.rope_theta, x.dtype)

        all_hidden, all_attentions = (), ()
        if self._can_run_fast(output_attentions, output_hidden_states):
            x = self._blocks_fast(x, attn_mask, cache, rotary)
        else:
            for block in self.h:
                if output_hidden_states:
                    all_hidden += (x,)
                x, att = block(x, attn_mask, cache=cache, output_attentions=output_attentions, rotary=rotary)
                if output_attentions:
                    all_attentions += (att,)
        x = self.ln_f(x)
        if output_hidden_states:
            all_hidden += (x,)

        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=all_hidden if output_hidden_states else None,
            attentions=all_attentions if output_attentions else None,
            **{_CACHE_FIELD: cache},
        )
        return out if return_dict else out.to_tuple()

    # --------------------------------------------------------------------------------- inference fast path
    def _can_run_fast(self, output_attentions, output_hidden_states):
        """Inference (eval mode, no autograd) with SDPA, nothing asked of the blocks but their output, and no hook on
        any block, attention, MLP or norm module (FSDP, accelerate's device maps, interpretability tools use them;
        Linear layers are always called when hooked or replaced, see _linear)."""
        if self.training or torch.is_grad_enabled() or output_attentions or output_hidden_states:
            return False
        if self.config._attn_implementation != "sdpa" or torch.compiler.is_compiling():
            return False
        from torch.nn.modules import module as torch_module

        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return False
        return not any(_hooked(m) for block in self.h for m in (block, block.ln_1, block.attn, block.ln_2, block.mlp))

    def _blocks_fast(self, x, attn_mask, cache, rotary):
        """The blocks without module calls: the same functions in the same order as Block.forward (dropout is the
        identity in eval mode), so the same numbers, at a fraction of the Python cost per decoded token."""
        qk_norm = self.config.qk_norm
        for block in self.h:
            y, _ = _self_attention(block.attn, _apply_norm(block.ln_1, x), cache, attn_mask, rotary, qk_norm, False)
            x = x + y
            x = x + _feed_forward(block.mlp, _apply_norm(block.ln_2, x))
        return x

    def _check_length(self, T, past):
        # Skipped while compiling: a static cache's length is a tensor, and comparing it would break the graph.
        if not torch.compiler.is_compiling() and past + T > self.config.block_size:
            raise ValueError(
                f"Cannot forward a sequence of length {past + T}: block size is only {self.config.block_size}. "
                f"Shorten the input (generate() crops the context by itself, as nanoGPT does)."
            )

    def _embed_tokens(self, input_ids, past):
        """Token embeddings; an id outside the vocabulary is one ValueError in training and inference alike."""
        V = self.config.vocab_size
        # An explicit check costs a device sync, so it guards prompts (inference, once per generate() at the
        # prefill), not training steps; on CPU the embedding's own IndexError is translated below. (On a GPU an
        # out-of-range id in training is a device-side assert: the trainer checks the data's vocabulary instead.)
        if not (torch.compiler.is_compiling() or self.training or past) and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= V:
                raise ValueError(f"token ids must be in [0, {V}), got min {lo} and max {hi}: encode with this model's tokenizer")
        try:
            return self.wte(input_ids)
        except IndexError as e:
            raise ValueError(f"token ids must be in [0, {V}): encode with this model's tokenizer ({e})") from e


class NanoGPTForCausalLM(NanoGPTPreTrainedModel, GenerationMixin):
    # weight tying: https://paperswithcode.com/method/weight-tying (a dict in transformers 5)
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: NanoGPTConfig):
        super().__init__(config)
        self.transformer = NanoGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()  # ties lm_head to wte (config.tie_word_embeddings, _tied_weights_keys)

    # ------------------------------------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # -------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """Returns a `CausalLMOutputWithPast` (a tuple with return_dict=False).

        labels: HF convention, aligned with input_ids; shifted inside (position t predicts labels[t + 1]).
        shift_labels (keyword): nanoGPT's targets, already shifted (position t predicts shift_labels[t]); the
            trainer uses them so that a window of block_size + 1 tokens trains on all block_size targets. It is not
            a named parameter: Trainer would take it for the batch's labels (`find_labels`).
        num_items_in_batch (keyword): Trainer's token count under gradient accumulation (transformers' loss).
        logits_to_keep: 0 keeps every position; an int n keeps the last n; a 1-D tensor keeps those positions.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.transformer(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        x = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            x = x[:, -logits_to_keep:, :] if logits_to_keep > 0 else x  # (B, T', n_embd)
        else:
            x = x[:, logits_to_keep, :]
        logits = _linear(self.lm_head, x)  # (B, T', vocab_size)
        if self.config.logit_softcap:  # bounded logits (Gemma 2; modded-nanogpt): c * tanh(logits / c)
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)

        loss = None
        shift_labels = kwargs.get("shift_labels")
        if labels is not None or shift_labels is not None:
            if logits.size(1) != (labels if labels is not None else shift_labels).size(1):
                raise ValueError("labels need the logits of every position: do not combine them with logits_to_keep")
            loss = self.loss_function(
                logits, labels, vocab_size=self.config.vocab_size,
                shift_labels=shift_labels.contiguous() if shift_labels is not None else None,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
            **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)},
        )
        return result if return_dict else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, *args, inputs_embeds=None, **kwargs):
        """transformers' preparation, plus nanoGPT's context crop: once the sequence would outgrow block_size,
        condition on its last block_size tokens, recomputed from an empty cache (nanoGPT's `idx[:, -block_size:]`).

        `inputs_embeds` is a named parameter because transformers decides from this signature whether a model can
        generate from embeddings (prompt tuning, soft prompts, multimodal adapters): as GPT2LMHeadModel does, the
        embeddings feed the first step and the generated ids every later one."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        new_ids = inputs.get("input_ids")
        cache = inputs.get("cache", inputs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0
        block_size = self.config.block_size
        if new_ids is None or past + new_ids.size(1) <= block_size:
            return inputs
        if past and getattr(cache, "is_compileable", False):
            cache.reset()  # a static cache: its slots are overwritten from position 0 again
        elif past:
            cache.crop(-past)  # a dynamic cache: emptied (transformers 5.x, old and new crop semantics alike)
        # the known ids (after an embeddings prompt, only the generated ones: its embeddings cannot be recomputed)
        inputs["input_ids"] = input_ids[:, -block_size:].contiguous()
        mask = kwargs.get("attention_mask")
        inputs.pop("position_ids", None)  # recomputed from the cropped mask
        if mask is not None and mask.dim() == 2:
            inputs["attention_mask"] = mask[:, -inputs["input_ids"].size(1):].contiguous()
        else:
            inputs.pop("attention_mask", None)
        return inputs

    def _get_stopping_criteria(self, *args, **kwargs):
        # transformers warns once a sequence outgrows max_position_embeddings; here that is expected, not a risk:
        # the context is cropped (prepare_inputs_for_generation above), so the length criterion need not know it
        criteria = super()._get_stopping_criteria(*args, **kwargs)
        for criterion in criteria:
            if getattr(criterion, "max_position_embeddings", None) is not None:
                criterion.max_position_embeddings = None
        return criteria

    # ------------------------------------------------------------------------------------ nanoGPT seed API
    def get_num_params(self, non_embedding=True):
        """Number of parameters; by default without the position embeddings (nanoGPT's convention: the token
        embeddings are counted, since weight tying makes them the output layer's weights too)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and self.transformer.wpe is not None:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def flops_per_token(self, seq_len=None):
        """Training FLOPs (forward + backward) per token, PaLM paper Appendix B (https://arxiv.org/abs/2204.02311),
        as in nanoGPT's estimate_mfu: 6N for the matmuls with weights plus 12 * L * H * Q * T for attention. N counts
        the weights that multiply: not the position table, and with an untied head not the input embedding either
        (a lookup; the head is the matmul). With a tied one the shared matrix is counted once, as the head."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, seq_len or cfg.block_size
        N = self.get_num_params()
        if not cfg.tie_word_embeddings:
            N -= self.transformer.wte.weight.numel()
        return 6 * N + 12 * L * H * Q * T

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12, seq_len=None):
        """Model FLOPs utilization: achieved FLOP/s as a fraction of peak_flops (default A100 bf16, nanoGPT's)."""
        T = seq_len or self.config.block_size
        flops_per_iter = self.flops_per_token(T) * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    def crop_block_size(self, block_size):
        """Model surgery to use a smaller context than the checkpoint's (e.g. GPT-2's 1024 down to 256)."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"crop_block_size: block_size must be in [1, {self.config.block_size}], got {block_size}")
        self.config.block_size = block_size
        if self.transformer.wpe is not None:  # rotary positions need no surgery
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())
            self.transformer.wpe.num_embeddings = block_size

    def predict(self, idx, targets=True):
        """The seed's logits API. targets=True: logits for every position (B, T, vocab); targets=False: only for
        the last position (B, 1, vocab), nanoGPT's inference-time optimisation. A tensor of already shifted
        targets returns (logits, loss) exactly like nanoGPT's forward(idx, targets)."""
        if isinstance(targets, torch.Tensor):
            out = self(idx, shift_labels=targets, use_cache=False)
            return out.logits, out.loss
        return self(idx, use_cache=False, logits_to_keep=0 if targets else 1).logits

    def generate(self, *args, **kwargs):
        """nanoGPT's `generate(idx, max_new_tokens, temperature=1.0, top_k=None)` or transformers' `generate(...)`.

        The rule: nanoGPT's sampler runs only when max_new_tokens is given and every keyword is one of nanoGPT's
        (idx, max_new_tokens, temperature, top_k); any other keyword makes it transformers' generate, where a
        positional int after the inputs is max_new_tokens.
        """
        if _is_nanogpt_generate_call(args, kwargs):
            return self._generate_nanogpt(*args, **kwargs)
        if _positional_max_new_tokens(args):
            if "max_new_tokens" in kwargs:
                raise TypeError("generate() got max_new_tokens twice (positionally and as a keyword)")
            args, kwargs = (args[0], *args[2:]), {**kwargs, "max_new_tokens": args[1]}
        return super().generate(*args, **kwargs)

    @torch.no_grad()
    def _generate_nanogpt(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete the sequence
        max_new_tokens times, feeding the predictions back into the model each time (nanoGPT's loop). In inference
        the model keeps its keys and values (decode_logits), so each step computes one token, not the whole context;
        in training mode (dropout on, hooks, ...) it recomputes the context each step, exactly as nanoGPT does."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature} (for greedy decoding use do_sample=False)")
        if top_k is not None and not 0 < top_k:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        cache = DynamicCache(config=self.config) if self.transformer._can_run_fast(False, False) else None
        for _ in range(max_new_tokens):
            if cache is not None:
                logits = self.decode_logits(idx, cache)
            else:
                # if the sequence context is growing too long we must crop it at block_size
                idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
                logits = self(idx_cond, use_cache=False, logits_to_keep=1).logits[:, -1, :]
            # pluck the logits at the final step and scale by desired temperature
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    # ------------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode_logits(self, idx, cache):
        """The next token's logits (B, V), in fp32, for the sequences idx (B, t) whose first cache.get_seq_length()
        tokens the cache already holds: only the rest is computed. Past block_size, nanoGPT's crop: the cache is
        emptied and the last block_size tokens recomputed. The inference fast path (eval mode, no hooks on the
        blocks, no padding): the same numbers as forward(), without its per-call work. nanogpt-sample, the seed
        API's generate and transformers' generate (_sample) decode through it."""
        block_size, past = self.config.block_size, int(cache.get_seq_length())
        if idx.size(1) > block_size:
            if past and getattr(cache, "is_compileable", False):
                cache.reset()  # a static cache: its slots are overwritten from position 0 again
            elif past:
                cache.crop(-past)  # a dynamic cache: emptied (transformers 5.x, old and new crop semantics alike)
            idx, past = idx[:, -block_size:], 0
        new = idx[:, past:]
        t = self.transformer
        x = t._embed_tokens(new, past)  # (B, T, n_embd)
        positions = past + torch.arange(new.size(1), device=new.device)  # (T,)
        rotary = None
        if t.wpe is not None:
            x = x + F.embedding(positions, t.wpe.weight)
        else:
            rotary = _rotary(positions, self.config.n_embd // self.config.n_head, self.config.rope_theta, x.dtype)
        attn_mask = _attention_mask(None, new.size(1), past, _static_length(cache), x.device)  # a static cache's
        x = _apply_norm(t.ln_f, t._blocks_fast(x, attn_mask, cache, rotary))
        logits = _linear(self.lm_head, x[:, -1, :])  # (B, V)
        if self.config.logit_softcap:
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        return logits.float()

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        """transformers' greedy/sampling loop, run through decode_logits where nothing of the general loop is needed:
        no padding, a dynamic or static cache, no scores or other extras, the fast path's conditions, no forward that
        transformers compiles (_compiles_forward). The logits processors, stopping criteria, token bookkeeping and
        streamer calls are transformers' own, so the tokens are the same; the per-token cost is a third of the general
        loop's at small sizes (docs/performance.md). Anything else goes to transformers' own loop."""
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        simple = (
            not synced_gpus and not generation_config.return_dict_in_generate
            and model_kwargs.get("attention_mask") is None and model_kwargs.get("inputs_embeds") is None
            and type(cache) in (DynamicCache, StaticCache) and not getattr(generation_config, "is_assistant", False)
            and self.transformer._can_run_fast(False, False)
            and not self._compiles_forward(input_ids, model_kwargs, generation_config)
        )
        if not simple:
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        pad = generation_config._pad_token_tensor
        has_eos = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        while True:
            scores = logits_processor(input_ids, self.decode_logits(input_ids, cache))
            if generation_config.do_sample:
                next_tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(scores, dim=-1)
            if has_eos:
                next_tokens = next_tokens * unfinished + pad.to(input_ids.device) * (1 - unfinished)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            unfinished = unfinished & ~stopping_criteria(input_ids, None)
            if streamer is not None:  # as transformers' loop: each step's tokens (generate() put the prompt), then end
                streamer.put(next_tokens.cpu())
            if unfinished.max() == 0:
                if streamer is not None:
                    streamer.end()
                return input_ids

    def _compiles_forward(self, input_ids, model_kwargs, generation_config):
        """Whether transformers' loop would run a compiled forward (a static cache on a GPU: CUDA graphs take the
        per-token launch cost away). On a CPU the eager fast path is faster than the compiled forward (277 vs 195-215
        tokens/s, 6L/384, docs/performance.md), so decoding there takes it whatever compile_config says."""
        return input_ids.device.type != "cpu" and self._valid_auto_compile_criteria(model_kwargs, generation_config)

    # ---------------------------------------------------------------------------------- GPT-2 checkpoints
    @classmethod
    def from_gpt2(cls, name_or_path="gpt2", dropout=None, **kwargs):
        """Load OpenAI's GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl, with or without `openai-community/`) or a
        local GPT2LMHeadModel folder. kwargs override config fields (e.g. bias, block_size is cropped after)."""
        gpt2_config, state_dict = load_gpt2_state_dict(name_or_path)
        config = nanogpt_config_from_gpt2(gpt2_config, dropout=dropout, **kwargs)
        model = cls(config)
        if not config.bias:  # an exported bias=False model carries zero biases, which are the same function
            nonzero = [k for k, v in state_dict.items() if k.endswith(".bias") and v.abs().max() > 0]
            if nonzero:
                raise ValueError(f"{name_or_path}: bias=False, but the checkpoint has non-zero biases ({nonzero[0]})")
            state_dict = {k: v for k, v in state_dict.items() if not k.endswith(".bias")}
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
        if missing or unexpected:
            raise ValueError(f"{name_or_path}: not a GPT-2 checkpoint (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.tie_weights()
        return model

    def to_gpt2(self):
        """An equivalent vanilla transformers GPT2LMHeadModel (zero biases where this model has none)."""
        return to_gpt2_model(self)


def _is_nanogpt_generate_call(args, kwargs):
    """nanoGPT's form: max_new_tokens given (second positional or keyword), no keyword outside nanoGPT's four."""
    nanogpt_keys = {"idx", "max_new_tokens", "temperature", "top_k"}
    if not set(kwargs) <= nanogpt_keys or len(args) > 4:
        return False
    return _positional_max_new_tokens(args) or "max_new_tokens" in kwargs


def _positional_max_new_tokens(args):
    """generate(ids, 50, ...): an int after the inputs is max_new_tokens in both forms."""
    return len(args) >= 2 and isinstance(args[1], int) and not isinstance(args[1], bool)


def _static_length(cache):
    """A static cache's preallocated length (attention sees all of its slots, filled or not); None otherwise."""
    layers = getattr(cache, "layers", None) if cache is not None else None
    return getattr(layers[0], "max_cache_len", None) if layers else None


def _attention_mask(attention_mask, T, past, static_length, device):
    """The mask for T queries at positions past.. : a 4-D mask as given, a boolean (B or 1, 1, T, S), or None where
    SDPA's `is_causal` (or, for one query over exactly the keys seen so far, nothing) suffices. S is past + T, or a
    static cache's length, whose empty slots are masked."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask  # built by generate() for a static cache
    if attention_mask is None and static_length is None and (past == 0 or T == 1):
        return None
    S = static_length if static_length is not None else past + T
    q_pos = past + torch.arange(T, device=device)  # (T,)
    k_pos = torch.arange(S, device=device)  # (S,)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S): causal, and no empty static-cache slot
    if attention_mask is not None:
        key_valid = attention_mask[:, -(past + T):].bool()  # (B, past + T)
        key_valid = F.pad(key_valid, (0, S - key_valid.size(1)), value=False)  # (B, S)
        mask = mask & key_valid[:, None, None, :]  # (B, 1, T, S)
        # a padded query row would see no key at all and make SDPA return NaN: let it see everything instead
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


def _position_ids(attention_mask, T, past, device):
    """Positions count real tokens only, so a left-padded prompt gets the positions it would have unpadded."""
    if attention_mask is None or attention_mask.dim() != 2:
        return past + torch.arange(T, dtype=torch.long, device=device)  # (T,)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    return positions[:, -T:]  # (B, T)
