"""nanogpt-hf: nanoGPT as a first-class Hugging Face model.

Importing the package registers the `nanogpt` model type with the Auto classes, so `AutoConfig`,
`AutoModelForCausalLM`, `AutoTokenizer` and `pipeline("text-generation")` load our folders in-process, and
marks the classes for `auto_map`, so every saved folder carries its code and loads anywhere with
`trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .configuration_nanogpt import GPT2_PRESETS, NanoGPTConfig
from .modeling_nanogpt import NanoGPTForCausalLM
from .tokenization_nanogpt_char import NanoGPTCharTokenizer

__all__ = ["NanoGPTConfig", "NanoGPTForCausalLM", "NanoGPTCharTokenizer", "GPT2_PRESETS"]
__version__ = "0.1.0"

AutoConfig.register(NanoGPTConfig.model_type, NanoGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(NanoGPTConfig, NanoGPTForCausalLM, exist_ok=True)
AutoTokenizer.register(NanoGPTConfig, slow_tokenizer_class=NanoGPTCharTokenizer, exist_ok=True)

# Self-contained checkpoints need BOTH: with only the model registered a fresh process cannot build its config.
NanoGPTConfig.register_for_auto_class()
NanoGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
NanoGPTCharTokenizer.register_for_auto_class("AutoTokenizer")
