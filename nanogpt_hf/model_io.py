"""Model folders: what `init_from` names, and how a complete, loadable HF folder is written.

A model folder holds config.json (with auto_map), model.safetensors, the modeling code, the tokenizer and
generation_config.json: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`,
`pipeline("text-generation", model=folder)` and nanogpt-sample work on it directly.
"""

import os
import pickle
import tempfile

from safetensors import SafetensorError

from .errors import UserError
from .sources import cache_only_if_hub_unreachable, fetch_file, offline_errors, offline_miss, read_json

__all__ = ["GPT2_NAMES", "is_gpt2_name", "save_model_folder", "load_model", "load_model_and_tokenizer",
           "from_pretrained_strict", "model_config_of", "enable_activation_checkpointing"]

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def is_gpt2_name(name):
    return name.removeprefix("openai-community/") in GPT2_NAMES


def save_model_folder(model, tokenizer, folder, extra_files=None):
    """Writes the HF folder to a temporary sibling and swaps it in, so `folder` is never half-written.

    Files in `folder` that are not part of the model (e.g. a training run's checkpoints/ and logs) are kept:
    the model files are moved in one by one after the whole set is written."""
    from transformers import GenerationConfig

    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".model-tmp-", dir=folder)
    if tokenizer is not None:  # the config carries the special ids too, so exports (nanogpt-export) keep them
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        model.config.pad_token_id, model.config.eos_token_id = pad, eos
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
        GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad).save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            f.write(text)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    os.rmdir(tmp)


def _is_model_folder(path):
    return os.path.isfile(os.path.join(path, "config.json"))


def load_model(name_or_path, dropout=None, **overrides):
    """A NanoGPTForCausalLM from: gpt2* (OpenAI), a folder or hub id holding a NanoGPT or GPT-2 model."""
    try:
        with cache_only_if_hub_unreachable(name_or_path):
            return _load_model(name_or_path, dropout, **overrides)
    except UserError:
        raise
    except offline_errors() as e:
        raise offline_miss(name_or_path) from e
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, KeyError, SafetensorError) as e:
        # unreadable or corrupt weights (a truncated safetensors, a pickle where weights belong): no traceback
        raise UserError(f"{name_or_path}: cannot load the model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def _load_model(name_or_path, dropout, **overrides):
    from .modeling_nanogpt import NanoGPTForCausalLM

    if is_gpt2_name(name_or_path):
        return NanoGPTForCausalLM.from_gpt2(name_or_path, dropout=dropout, **overrides)
    if os.path.isdir(name_or_path) and not _is_model_folder(name_or_path):
        raise UserError(f"{name_or_path}: no config.json here, so it is not a model folder (train one, or name gpt2*)")
    model_type = _model_type(name_or_path)
    if model_type == "gpt2":
        model_config_of(name_or_path)  # a valid config, of a size this machine can build, before anything is built
        return NanoGPTForCausalLM.from_gpt2(name_or_path, dropout=dropout, **overrides)
    if model_type != "nanogpt":
        raise UserError(f"{name_or_path}: model_type {model_type!r} is neither nanogpt nor gpt2")
    kwargs = dict(overrides)
    if dropout is not None:
        kwargs["dropout"] = dropout
    return from_pretrained_strict(name_or_path, **kwargs)  # checks the config (model_config_of) first


def from_pretrained_strict(folder, **kwargs):
    """Our own folders load strictly: a weight that is missing, unexpected or of another shape than config.json
    says (an edited config, a damaged file) is an error, never a silently random-initialised model."""
    from .modeling_nanogpt import NanoGPTForCausalLM

    model_config_of(folder)
    model, info = NanoGPTForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:
        detail = "; ".join(f"{k.replace('_keys', '')}: {', '.join(map(str, sorted(v)[:3]))}" for k, v in problems.items())
        raise UserError(f"{folder}: its weights do not match its config.json ({detail}); the folder was edited or is "
                        f"damaged")
    return model


def _raw_config(name_or_path):
    path = fetch_file(name_or_path, "config.json")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: holds a JSON {type(raw).__name__}, not a model config object; the folder was edited "
                        f"or is damaged")
    return raw


def _model_type(name_or_path):
    return _raw_config(name_or_path).get("model_type")


# No model of more parameters is built from a config.json, whatever the machine (gpt2-xl has 1.6e9)
MAX_PARAMETERS = 1e12


def approx_num_parameters(config):
    """The parameter count a NanoGPTConfig describes, from the config alone (GPT-2's layout: 12 E^2 per block for
    the attention and MLP matrices, the embeddings, an untied head), to refuse before building."""
    E, L, V = config.n_embd, config.n_layer, config.vocab_size
    positions = config.block_size * E if config.position_embedding == "learned" else 0
    head = 0 if config.tie_word_embeddings else V * E
    return L * (12 * E * E + 13 * E) + V * E + positions + head


def _check_buildable(config, where):
    """A config.json naming a model this machine cannot hold (n_layer=1e9: layers would be built until memory runs
    out, silently) is refused in one line before anything is built."""
    n = approx_num_parameters(config)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else float("inf")
    if n > MAX_PARAMETERS or 4 * n > memory:
        raise UserError(f"{where}: its config.json describes a model of {n:.3g} parameters ({4 * n / 1e9:,.0f} GB in "
                        f"fp32), more than this machine's {memory / 1e9:,.0f} GB of memory"
                        f"{'' if n <= MAX_PARAMETERS else ' and any model this tool builds (1e12)'}: the folder was "
                        f"edited or is damaged")


def model_config_of(name_or_path):
    """The NanoGPTConfig a model source would load with, read from its config.json alone (no weights): how the
    trainer knows a finetune's shape before anything is built. Refused in one line: a config that is not an object,
    not valid, or of a model this machine cannot hold."""
    from .configuration_nanogpt import GPT2_PRESETS, NanoGPTConfig
    from .gpt2_conversion import nanogpt_config_from_gpt2

    if is_gpt2_name(name_or_path):  # OpenAI's four: nanoGPT's table (vocab 50257, context 1024, biases, tanh GELU)
        preset = GPT2_PRESETS[name_or_path.removeprefix("openai-community/")]
        return nanogpt_config_from_gpt2({**preset, "vocab_size": 50257, "n_positions": 1024})
    with cache_only_if_hub_unreachable(name_or_path):
        raw = _raw_config(name_or_path)
    try:
        if raw.get("model_type") == "gpt2":
            config = nanogpt_config_from_gpt2(raw)
        elif raw.get("model_type") == "nanogpt":
            config = NanoGPTConfig.from_dict(raw)
        else:
            raise UserError(f"{name_or_path}: model_type {raw.get('model_type')!r} is neither nanogpt nor gpt2")
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{name_or_path}: its config.json is not a valid model config ({e})") from e
    _check_buildable(config, name_or_path)
    return config


def load_model_and_tokenizer(name_or_path, trust_remote_code=False, **kwargs):
    """Model plus its tokenizer: the folder's own, or the GPT-2 BPE one for gpt2* and GPT-2 folders. The model is
    always built with this package's classes (a folder's own modeling code never runs); a tokenizer whose folder
    names code of its own loads only with trust_remote_code=True."""
    from .tokenization import gpt2_hf_tokenizer, load_tokenizer

    model = load_model(name_or_path, **kwargs)
    if is_gpt2_name(name_or_path):
        return model, gpt2_hf_tokenizer(model.config.block_size)
    folder = name_or_path if os.path.isdir(name_or_path) else None
    has_tokenizer = folder is None or any(
        os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))
    tokenizer = (load_tokenizer(name_or_path, trust_remote_code) if has_tokenizer
                 else gpt2_hf_tokenizer(model.config.block_size))
    return model, tokenizer


def enable_activation_checkpointing(model, kwargs=None):
    """transformers' activation (gradient) checkpointing; 5.2x renamed the method and the old name warns."""
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    enable(kwargs)
