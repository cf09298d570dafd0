"""nanogpt-hf: nanoGPT as a first-class Hugging Face model.

Importing the package registers the `nanogpt` model type with the Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoTokenizer` and `pipeline(...)` load our folders in-process, and marks the classes for
`auto_map`, so every saved folder carries its code and loads anywhere with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_nanogpt import GPT2_PRESETS, NanoGPTConfig
from .modeling_nanogpt import NanoGPTForCausalLM, NanoGPTModel
from .tokenization_nanogpt_char import NanoGPTCharTokenizer

__all__ = ["NanoGPTConfig", "NanoGPTModel", "NanoGPTForCausalLM", "NanoGPTCharTokenizer", "GPT2_PRESETS"]
__version__ = "0.2.0"

AutoConfig.register(NanoGPTConfig.model_type, NanoGPTConfig, exist_ok=True)
AutoModel.register(NanoGPTConfig, NanoGPTModel, exist_ok=True)
AutoModelForCausalLM.register(NanoGPTConfig, NanoGPTForCausalLM, exist_ok=True)
# folders saved before 0.2 carry the hand-written char tokenizer; newer ones a stock PreTrainedTokenizerFast
AutoTokenizer.register(NanoGPTConfig, slow_tokenizer_class=NanoGPTCharTokenizer, exist_ok=True)

# Self-contained checkpoints need BOTH: with only the model registered a fresh process cannot build its config.
NanoGPTConfig.register_for_auto_class()
NanoGPTModel.register_for_auto_class("AutoModel")
NanoGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
NanoGPTCharTokenizer.register_for_auto_class("AutoTokenizer")
