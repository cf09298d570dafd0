"""NanoGPT as a Hugging Face causal LM.

The architecture is nanoGPT's model.py, which is GPT-2's: pre-LayerNorm blocks, learned position embeddings,
a 4x MLP with GELU (GPT-2's tanh approximation or nanoGPT's exact one), causal self-attention through
`scaled_dot_product_attention` (flash attention where the device has it), tied input/output embeddings.
Parameter names equal GPT2LMHeadModel's, so OpenAI's checkpoints load with only the Conv1D weights transposed
(see gpt2_conversion.py).

References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py
3) huggingface/transformers PyTorch implementation:
   https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py

This file is copied next to every saved model, so it imports only transformers, torch and the files beside it.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanogpt import NanoGPTConfig
from .gpt2_conversion import load_gpt2_state_dict, nanogpt_config_from_gpt2, to_gpt2_model

try:  # transformers >= 5: init helpers that skip tensors already loaded by from_pretrained
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    init = nn.init

__all__ = ["NanoGPTForCausalLM", "NanoGPTPreTrainedModel"]

# transformers 5.24 renamed the cache field of model outputs from `past_key_values` to `cache`; earlier 5.x
# (and the GPU machines' 5.17) use the old name. generate() reads the cache back from this field.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection; a residual projection, so GPT-2's scaled init applies (see _init_weights)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.layer_idx = layer_idx

    def forward(self, x, cache=None, attn_mask=None):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            # the cache returns all keys/values seen so far: (B, nh, past + T, hs)
            k, v = cache.update(k, v, self.layer_idx)
        # Without a mask, a causal mask is only needed when the queries start at the first key; a single
        # new query (cached decoding) sees every key.
        is_causal = attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)
        # GPT-2 uses the tanh approximation of GELU ("gelu_new"), nanoGPT the exact one (nn.GELU()). Both run as
        # one PyTorch kernel (transformers' NewGELUActivation is five), and on CPU the exact one is ~4x faster
        # than the tanh one (measured fwd 105 vs 406 us, bwd 188 vs 398 us at 768x512 on 2 AVX-512 cores).
        self.gelu_approximate = "none" if config.activation_function == "gelu" else "tanh"

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu_approximate)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), cache, attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class NanoGPTPreTrainedModel(PreTrainedModel):
    config_class = NanoGPTConfig
    config: NanoGPTConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
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
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class NanoGPTForCausalLM(NanoGPTPreTrainedModel, GenerationMixin):
    # weight tying: https://paperswithcode.com/method/weight-tying (a dict in transformers 5)
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: NanoGPTConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        self.post_init()

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
        labels=None,
        shift_labels=None,
        cache=None,
        past_key_values=None,
        use_cache=None,
        logits_to_keep=0,
        num_items_in_batch=None,
        return_dict=None,
        **kwargs,
    ):
        """Returns a `CausalLMOutputWithPast`.

        labels: HF convention, aligned with input_ids; shifted inside (position t predicts labels[t + 1]).
        shift_labels: nanoGPT convention, already shifted (position t predicts shift_labels[t]); the trainer uses
            it so that a window of block_size + 1 tokens trains on all block_size targets.
        logits_to_keep: 0 keeps every position; an int n keeps the last n; a 1-D tensor keeps those positions.
        """
        if input_ids is None:
            raise ValueError("NanoGPTForCausalLM.forward needs input_ids (inputs_embeds is not supported)")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training  # only the default depends on training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        elif not use_cache:
            cache = None

        B, T = input_ids.size()
        past = cache.get_seq_length() if cache is not None else 0
        self._check_inputs(input_ids, past)
        attn_mask = _attention_mask(attention_mask, B, T, past)
        if position_ids is None:
            position_ids = _position_ids(attention_mask, T, past, input_ids.device)

        tok_emb = self.transformer.wte(input_ids)  # token embeddings of shape (B, T, n_embd)
        pos_emb = self.transformer.wpe(position_ids)  # position embeddings of shape (T, n_embd) or (B, T, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x, cache, attn_mask)
        x = self.transformer.ln_f(x)

        if isinstance(logits_to_keep, int):
            x = x[:, -logits_to_keep:, :] if logits_to_keep > 0 else x  # (B, T', n_embd)
        else:
            x = x[:, logits_to_keep, :]
        logits = self.lm_head(x)  # (B, T', vocab_size)

        loss = None
        if labels is not None or shift_labels is not None:
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]  # (B, T): position t predicts t + 1
            if logits.size(1) != shift_labels.size(1):
                raise ValueError("labels need the logits of every position: do not combine them with logits_to_keep")
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),
                shift_labels.reshape(-1).to(logits.device),
                ignore_index=-100,
                reduction="sum" if num_items_in_batch is not None else "mean",
            )
            if num_items_in_batch is not None:
                loss = loss / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})

    def _check_inputs(self, input_ids, past):
        T = input_ids.size(1)
        if past + T > self.config.block_size:
            raise ValueError(
                f"Cannot forward a sequence of length {past + T}: block size is only {self.config.block_size}. "
                f"Shorten the input (or use model.generate(idx, max_new_tokens), which crops the context)."
            )
        # A data-dependent check forces a device sync and breaks compiled graphs: it guards prompts (inference),
        # not training batches (the data's vocabulary is checked against the model's once, from meta.json).
        if torch.compiler.is_compiling() or self.training:
            return
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}), got min {int(input_ids.min())} and max "
                f"{int(input_ids.max())}: encode with this model's tokenizer"
            )

    # ------------------------------------------------------------------------------------ nanoGPT seed API
    def get_num_params(self, non_embedding=True):
        """Number of parameters; by default without the position embeddings (nanoGPT's convention: the token
        embeddings are counted, since weight tying makes them the output layer's weights too)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def flops_per_token(self, seq_len=None):
        """Training FLOPs (forward + backward) per token, PaLM paper Appendix B (https://arxiv.org/abs/2204.02311),
        as in nanoGPT's estimate_mfu: 6N for the matmuls with weights plus 12 * L * H * Q * T for attention."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, seq_len or cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

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
        """nanoGPT's `generate(idx, max_new_tokens, temperature=1.0, top_k=None)` or HF's `generate(...)`.

        The nanoGPT form is taken when max_new_tokens is the second positional argument, or when the only
        keywords are nanoGPT's and temperature or top_k is among them: it samples like nanoGPT, cropping the
        context to block_size so it runs past it. Anything else (generation_config, do_sample, top_p,
        num_beams, attention_mask, ...) goes to transformers' GenerationMixin.generate with the KV cache.
        """
        if _is_nanogpt_generate_call(args, kwargs):
            return self._generate_nanogpt(*args, **kwargs)
        return super().generate(*args, **kwargs)

    @torch.no_grad()
    def _generate_nanogpt(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete the sequence
        max_new_tokens times, feeding the predictions back into the model each time (nanoGPT's loop)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature} (for greedy decoding use do_sample=False)")
        if top_k is not None and not 0 < top_k:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        for _ in range(max_new_tokens):
            # if the sequence context is growing too long we must crop it at block_size
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits = self(idx_cond, use_cache=False, logits_to_keep=1).logits
            # pluck the logits at the final step and scale by desired temperature
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

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
    if len(args) >= 2 and isinstance(args[1], int) and not isinstance(args[1], bool):
        return True
    nanogpt_keys = {"idx", "max_new_tokens", "temperature", "top_k"}
    return bool(kwargs) and set(kwargs) <= nanogpt_keys and ("temperature" in kwargs or "top_k" in kwargs or "idx" in kwargs)


def _attention_mask(attention_mask, B, T, past):
    """A boolean SDPA mask (B, 1, T, past + T), or None where `is_causal` (or no mask at all) suffices."""
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
        if past == 0 or T == 1:
            return None
        key_valid = None
    else:
        key_valid = attention_mask[:, -(past + T) :].bool()  # (B, S)
    S = past + T
    device = attention_mask.device if attention_mask is not None else None
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)  # (T, S)
    mask = causal[None, None, :, :]  # (1, 1, T, S)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]  # (B, 1, T, S)
        # a padded query row would see no key at all and make SDPA return NaN: let it see everything instead
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask.expand(B, 1, T, S)


def _position_ids(attention_mask, T, past, device):
    """Positions count real tokens only, so a left-padded prompt gets the positions it would have unpadded."""
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
        return torch.arange(past, past + T, dtype=torch.long, device=device)  # (T,)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    return positions[:, -T:]  # (B, T)
