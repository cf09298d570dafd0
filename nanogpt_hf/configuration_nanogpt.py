"""NanoGPT model configuration: nanoGPT's names and defaults, Hugging Face's names through `attribute_map`.

This file is copied next to every saved model (`save_pretrained` with `auto_map`), so it imports nothing from
the nanogpt_hf package: a checkpoint must load where nanogpt_hf is not installed.
"""

from transformers import PretrainedConfig

__all__ = ["NanoGPTConfig", "GPT2_PRESETS", "ACTIVATIONS", "POSITION_EMBEDDINGS", "NORMS"]

# GELU variants, by transformers' ACT2FN names: "gelu" is the exact (erf) GELU of nanoGPT's nn.GELU(); the tanh
# approximation is GPT-2's own ("gelu_new"; "gelu_pytorch_tanh" and "gelu_fast" are the same function).
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu2")  # relu2: ReLU(x)^2 (Primer; speedrun)

# Opt-in architecture options of the speedrun recipes (modded-nanogpt); the defaults are GPT-2's.
POSITION_EMBEDDINGS = ("learned", "rope")  # rope: rotary embeddings on queries and keys (RoFormer), no wpe
NORMS = ("layernorm", "rmsnorm")

# The four OpenAI GPT-2 sizes (nanoGPT's from_pretrained table). All share vocab 50257, block 1024, bias=True.
GPT2_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M params
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M params
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M params
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M params
}


class NanoGPTConfig(PretrainedConfig):
    model_type = "nanogpt"
    # HF code (generate, DynamicCache, masking utils, pipelines) reads the long names; nanoGPT users the short.
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "max_position_embeddings": "block_size",
        "n_positions": "block_size",
    }

    def __init__(
        self,
        vocab_size=50304,  # GPT-2's 50257 padded up to a multiple of 64 for efficiency (nanoGPT)
        block_size=1024,
        n_layer=12,
        n_head=12,
        n_embd=768,
        dropout=0.0,
        bias=True,  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
        activation_function="gelu_new",  # GPT-2's tanh GELU; "gelu" (exact) is nanoGPT's and ~4x faster on CPU
        initializer_range=0.02,
        layer_norm_epsilon=1e-5,
        use_cache=True,
        tie_word_embeddings=True,
        position_embedding="learned",
        rope_theta=10000.0,
        norm="layernorm",
        qk_norm=False,  # RMS-normalise queries and keys per head before attention (QK-norm)
        zero_init_residual=False,  # residual projections (attn.c_proj, mlp.c_proj) start at zero
        logit_softcap=None,  # logits = c * tanh(logits / c) (Gemma 2); None: off
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.dropout = dropout
        self.bias = bias
        self.activation_function = activation_function
        self.initializer_range = initializer_range
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_cache = use_cache
        # transformers 5 no longer declares this on the base class: without it tying silently does not happen.
        self.tie_word_embeddings = tie_word_embeddings
        self.position_embedding = position_embedding
        self.rope_theta = rope_theta
        self.norm = norm
        self.qk_norm = qk_norm
        self.zero_init_residual = zero_init_residual
        self.logit_softcap = logit_softcap
        self._validate_sizes()
        self._validate_options()
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    def _validate_sizes(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"NanoGPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"NanoGPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"NanoGPTConfig.activation_function must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {self.activation_function!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"NanoGPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")

    def _validate_options(self):
        for name, allowed in (("position_embedding", POSITION_EMBEDDINGS), ("norm", NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"NanoGPTConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.position_embedding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"NanoGPTConfig: rope needs an even head size, got {self.n_embd // self.n_head}")
        cap = self.logit_softcap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
            raise ValueError(f"NanoGPTConfig.logit_softcap must be a positive number or None, got {cap!r}")
