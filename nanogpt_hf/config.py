"""Training configuration: one typed block of nanoGPT's hyperparameters, YAML files, checked overrides.

Every key is a field of `TrainConfig` with its type, default and one line of help (`train_accelerate.py --help`
prints them). Resolution order, later wins: the defaults below < a model preset named in the YAML's
`defaults: [model: NAME]` < the YAML file < command-line `--key=value`. Unknown keys are refused with the closest
valid one; every value is checked against its field's type and rule, and a refusal names where the value came
from (the file or the command line). The resolved config is final before anything uses it, and is saved with
every run (out_dir/train_config.yaml).
"""

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field

import yaml

from .config_yaml import CONFIGS_DIR, MAX_CONFIG_BYTES, load_yaml_config, resolve_config_path, yaml_value
from .configuration_nanogpt import ACTIVATIONS, NORMS, POSITION_EMBEDDINGS
from .errors import UserError

__all__ = ["TrainConfig", "load_config", "resumed_config", "parse_cli", "help_text", "validate", "LOGGERS", "CLI",
           "COMMAND_KEYS", "MODEL_KEYS", "SHAPE_KEYS", "model_options"]

LOGGERS = ("wandb", "tensorboard", "trackio")
CLI = "command line"


def setting(default, help, rule=None, choices=None):
    """A config field: its default, one line of help, and the check its value must pass."""
    meta = {"help": help, "rule": rule, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# Rules: name -> (test, what the value must be)
RULES = {
    "positive": (lambda v: v > 0, "positive"),
    "non_negative": (lambda v: v >= 0, "zero or more"),
    "unit": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
}


@dataclass
class TrainConfig:
    """Default config values designed to train a gpt2 (124M) on OpenWebText, as nanoGPT's train.py."""

    # I/O
    out_dir: str = setting("out", "the run's folder: model files, checkpoints/, log.jsonl, train_config.yaml")
    eval_interval: int = setting(2000, "evaluate (and checkpoint) every this many iterations", "positive")
    log_interval: int = setting(1, "log the training loss every this many iterations", "positive")
    eval_iters: int = setting(200, "batches per split in each evaluation (in total over all processes)", "positive")
    eval_only: bool = setting(False, "evaluate the model once, then exit (nothing is saved)")
    always_save_checkpoint: bool = setting(True, "checkpoint at every evaluation, not only when val loss improves")
    init_from: str = setting("scratch", "scratch | resume | auto (resume if out_dir has a checkpoint) | gpt2* | a "
                                        "model folder | a hub id")
    resume_from: str = setting("", "init_from=resume: a checkpoint, an out_dir or a hub id (default: out_dir)")
    keep_last: int = setting(2, "checkpoints kept besides the best one", "non_negative")
    allow_data_change: bool = setting(False, "train on data that differ from the checkpoint's or from meta.json's "
                                             "fingerprint (sizes, sampled content)")
    trust_remote_code: bool = setting(False, "run code that a model folder or hub id names (a custom tokenizer): only "
                                             "for sources you trust")
    # data
    dataset: str = setting("openwebtext", "data/<dataset>/ holding train.bin, val.bin and meta.json (prepare.py)")
    data_dir: str = setting("", "a prepared folder to use instead of data/<dataset>")
    data_source: str = setting("memmap", "memmap (prepared bins) | streaming (tokenize a dataset on the fly)",
                               choices=("memmap", "streaming"))
    stream_dataset: str = setting("", "streaming: a datasets name ...")
    stream_files: list = setting([], "... or local .txt/.jsonl/.parquet files")
    stream_val_files: list = setting([], "streaming: held-out files for evaluation (else the dataset's val split)")
    stream_split: str = setting("train", "streaming: the split to train on")
    stream_val_split: str = setting("validation", "streaming: the split to evaluate on")
    stream_text_column: str = setting("text", "streaming: the column holding the text")
    gradient_accumulation_steps: int = setting(5 * 8, "micro-steps per iteration, in total over all processes "
                                                      "(rounded up to a multiple of the process count)", "positive")
    batch_size: int = setting(12, "micro-batch size per process", "positive")
    block_size: int = setting(1024, "context length in tokens", "positive")
    # model
    n_layer: int = setting(12, "transformer blocks", "positive")
    n_head: int = setting(12, "attention heads per block", "positive")
    n_embd: int = setting(768, "embedding width (a multiple of n_head)", "positive")
    dropout: float = setting(0.0, "dropout; for pretraining 0 is good, for finetuning try 0.1+", "unit")
    bias: bool = setting(False, "biases inside LayerNorm and Linear layers (GPT-2: true)")
    activation_function: str = setting("gelu", "gelu (nanoGPT's exact GELU) | gelu_new (GPT-2's tanh one)",
                                       choices=ACTIVATIONS)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, ~30% "
                                                  "more compute (large finetunes)")
    # model: the speedrun's architecture options (docs/speedrun.md); the defaults are GPT-2's
    position_embedding: str = setting("learned", "learned (GPT-2) | rope (rotary, no position table)",
                                      choices=POSITION_EMBEDDINGS)
    norm: str = setting("layernorm", "layernorm (GPT-2) | rmsnorm", choices=NORMS)
    qk_norm: bool = setting(False, "RMS-normalise queries and keys per head")
    zero_init_residual: bool = setting(False, "start the residual projections at zero (each block the identity)")
    logit_softcap: float = setting(0.0, "cap the logits smoothly at +-this value (c * tanh(x / c)); 0 disables",
                                   "non_negative")
    tie_word_embeddings: bool = setting(True, "share the token embedding and the output head (GPT-2); false unties")
    # optimizer
    optimizer: str = setting("adamw", "adamw (nanoGPT) | muon (Muon for the blocks' 2-D weights, AdamW for the rest)",
                             choices=("adamw", "muon"))
    muon_lr: float = setting(0.02, "optimizer=muon: max learning rate of the Muon weights", "non_negative")
    muon_momentum: float = setting(0.95, "optimizer=muon: Muon's (Nesterov) momentum", "unit")
    muon_ns_dtype: str = setting("auto", "optimizer=muon: dtype of Newton-Schulz; auto = bfloat16 where the device "
                                         "computes it natively (GPUs, CPUs with AVX512-BF16/AMX), else float32",
                                 choices=("auto", "float32", "bfloat16"))
    learning_rate: float = setting(6e-4, "max learning rate (of AdamW)", "non_negative")
    max_iters: int = setting(600000, "total number of training iterations", "non_negative")
    weight_decay: float = setting(1e-1, "AdamW weight decay of the 2-D weights", "non_negative")
    beta1: float = setting(0.9, "AdamW beta1", "unit")
    beta2: float = setting(0.95, "AdamW beta2", "unit")
    grad_clip: float = setting(1.0, "clip gradients at this norm, or disable if == 0.0", "non_negative")
    # learning rate decay settings
    decay_lr: bool = setting(True, "warm up, then decay the learning rate (lr_schedule)")
    lr_schedule: str = setting("cosine", "cosine (nanoGPT) | wsd (warmup, stable, then linear decay over the last "
                                         "cooldown_frac of lr_decay_iters)", choices=("cosine", "wsd"))
    cooldown_frac: float = setting(0.4, "lr_schedule=wsd: the fraction of lr_decay_iters spent decaying", "unit")
    warmup_iters: int = setting(2000, "how many steps to warm up for", "non_negative")
    lr_decay_iters: int = setting(600000, "decay until this iteration; should be ~= max_iters per Chinchilla",
                                  "non_negative")
    min_lr: float = setting(6e-5, "minimum learning rate, should be ~= learning_rate/10 per Chinchilla",
                            "non_negative")
    # system
    device: str = setting("auto", "auto | cpu | cuda: Accelerate places everything; cpu forces the CPU",
                          choices=("auto", "cpu", "cuda"))
    dtype: str = setting("auto", "auto (bf16 where supported, else fp16 on GPU, fp32 on CPU) | float32 | bfloat16 | "
                                 "float16", choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = setting(False, "torch.compile the model (falls back with a warning where unavailable)")
    seed: int = setting(1337, "random seed (weights, data order, dropout)", "seed")
    max_bad_steps: int = setting(10, "non-finite steps in a row before the run stops", "positive")
    ddp_timeout: int = setting(1800, "seconds a process waits in a collective for the others (a peer writing a "
                                     "checkpoint, a node gone) before the run stops; transformers' name", "positive")
    # logging
    wandb_log: bool = setting(False, "log to Weights & Biases (needs WANDB_API_KEY, or WANDB_MODE=offline)")
    wandb_project: str = setting("owt", "W&B project")
    wandb_run_name: str = setting("gpt2", "W&B run name")
    loggers: list = setting([], "more trackers: wandb, tensorboard, trackio (out_dir/log.jsonl is always written)")
    # hub
    push_to_hub: bool = setting(False, "push the model folder to the Hugging Face Hub")
    hub_model_id: str = setting("", "the Hub repository, e.g. your-name/my-gpt")
    hub_private: bool = setting(True, "create the Hub repository private")
    hub_strategy: str = setting("end", "end | every_save: push at the end, or after every checkpoint",
                                choices=("end", "every_save"))
    hub_push_training_state: bool = setting(False, "push the latest checkpoint too, so another machine can resume")

    def to_dict(self):
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# ----------------------------------------------------------------------------------------------- checks
def _suggest(key):
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else "; see train_accelerate.py --help"


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _coerce(key, value, source):
    """value checked against the field's type (ints are accepted for floats; YAML 1.1 reads 6e-4 as a string)."""
    expected = FIELDS[key].type
    default = getattr(TrainConfig(), key)
    if expected in (int, float) and isinstance(value, str):
        try:
            value = float(value) if expected is float else int(value, 0)
        except ValueError:
            pass
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise UserError(f"{source}: {key} must be a finite number, got {value!r}")
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is list:  # of strings (files, logger names)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not ok:
            raise UserError(f"{source}: {key} must be a list of strings (like ['a.jsonl', 'b.jsonl'] or a,b), got "
                            f"{_short(value)}")
    else:  # str
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"{source}: {key} must be {expected.__name__} (like {default!r}), got {value!r}")
    return value


def validate(cfg, sources, shape=True):
    """Every rule of every field, then the rules across fields; a refusal names where the value came from.
    shape=False leaves the model's shape to be checked once it is known (a resume: the run's own shape with this
    command's keys on top, so `--n_embd=64` is checked against the run's n_head, not the default's)."""
    def where(key):
        return sources.get(key, "the defaults")

    for name, f in FIELDS.items():
        value = getattr(cfg, name)
        rule, choices = f.metadata["rule"], f.metadata["choices"]
        if rule and not RULES[rule][0](value):
            raise UserError(f"{where(name)}: {name} must be {RULES[rule][1]}, got {value!r}")
        if choices and value not in choices:
            raise UserError(f"{where(name)}: {name} must be one of {', '.join(choices)}; got {value!r}")
    if not cfg.out_dir.strip():
        raise UserError(f"{where('out_dir')}: out_dir is empty; name a folder for the run, e.g. --out_dir=out")
    if cfg.decay_lr and cfg.min_lr > cfg.learning_rate:
        raise UserError(f"{where('min_lr')}: min_lr ({cfg.min_lr}) is above learning_rate ({cfg.learning_rate}); "
                        f"nanoGPT's rule is min_lr ~= learning_rate / 10")
    for name in cfg.loggers:
        if name not in LOGGERS:
            raise UserError(f"{where('loggers')}: unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise UserError(f"{where('push_to_hub')}: push_to_hub needs hub_model_id (e.g. your-name/my-gpt)")
    if cfg.data_source == "streaming":
        if bool(cfg.stream_dataset) == bool(cfg.stream_files):
            raise UserError(f"{where('data_source')}: data_source=streaming needs either stream_dataset (a datasets "
                            f"name) or stream_files (local files), not both or neither")
        if cfg.stream_files and not cfg.stream_val_files:
            raise UserError(f"{where('stream_files')}: streaming from local files has no validation split: give "
                            f"held-out files with --stream_val_files=a.jsonl,b.jsonl")
    if shape:
        _validate_model_shape(cfg, where)
    return cfg


MODEL_KEYS = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "activation_function", "position_embedding",
              "norm", "qk_norm", "zero_init_residual", "logit_softcap", "tie_word_embeddings")


# what a resumed run cannot change: the model keys but dropout and zero_init_residual (they do not change what the
# weights mean), and the vocabulary
SHAPE_KEYS = tuple(k for k in MODEL_KEYS if k not in ("dropout", "zero_init_residual")) + ("vocab_size",)


def model_options(cfg):
    """The NanoGPTConfig arguments a training config sets (logit_softcap 0 is the model's None)."""
    options = {k: getattr(cfg, k) for k in MODEL_KEYS}
    options["logit_softcap"] = options["logit_softcap"] or None
    return options


def _validate_model_shape(cfg, where):
    """The model's own config checks the shape (one place for those rules)."""
    from .configuration_nanogpt import NanoGPTConfig

    try:
        NanoGPTConfig(vocab_size=64, **model_options(cfg))
    except ValueError as e:
        key = next((k for k in ("n_embd", "n_head", "n_layer", "block_size", "dropout", "position_embedding")
                    if k in str(e)), "n_embd")
        raise UserError(f"{where(key)}: {str(e).removeprefix('NanoGPTConfig.')}") from e


def apply(values, updates, sources, source):
    """Checked updates into a plain {key: value} dict, recording each key's source."""
    for key, value in updates.items():
        if key not in FIELDS:
            raise UserError(f"{source}: unknown key {key!r}{_suggest(key)}")
        values[key] = _coerce(key, value, source)
        sources[key] = source


# ----------------------------------------------------------------------------------------------- CLI
def parse_cli(argv):
    """(config name or None, config_path or None, {key: value}) from `--config X --key=value --key value`.

    Also accepts the seed's `--config-path=DIR --config-name=NAME`, bare `key=value` (Hydra style) and nanoGPT's
    positional `config/NAME.py`."""
    name, config_path, overrides = None, None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise UserError(f"{arg} needs a value: {arg}=VALUE")
                value = argv[i + 1]
                i += 1
        elif "=" in arg:
            key, _, value = arg.partition("=")
        elif name is None and i == 0:
            key, value = "config", arg  # nanoGPT style: train.py config/train_shakespeare_char.py
        else:
            raise UserError(f"unexpected argument {arg!r}: use --key=value")
        key = key.replace("-", "_")
        if key in ("config", "config_name"):
            name = value
        elif key == "config_path":
            config_path = value
        else:
            if len(value) > MAX_CONFIG_BYTES:
                raise UserError(f"--{key}: a value of {len(value):,} characters is too long")
            try:
                overrides[key] = yaml_value(value) if value != "" else ""
            except yaml.composer.ComposerError as e:  # an alias or deep nesting: refused, not taken as a string
                raise UserError(f"--{key}={value[:60]}: {e.problem}") from e
            except yaml.YAMLError:
                overrides[key] = value
        i += 1
    return name, config_path, overrides


def help_text():
    lines = ["usage: train_accelerate.py [--config NAME_OR_PATH] [--key=value ...]", "",
             "Configs: a YAML path, or a name from ./configs or the shipped ones: "
             + ", ".join(sorted(f[:-5] for f in os.listdir(CONFIGS_DIR) if f.endswith(".yaml"))), "",
             "keys (type, default): help"]
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        lines.append(f"  --{name}  ({f.type.__name__}, {getattr(defaults, name)!r}): {f.metadata['help']}")
    return "\n".join(lines)


def load_config(argv=()):
    """(TrainConfig, sources) from command-line arguments. sources maps each key set by a file or the command
    line to where it came from (a path, or "command line")."""
    name, config_path, overrides = parse_cli(list(argv))
    values, sources = {}, {}
    if name:
        source_file = resolve_config_path(name, config_path)
        apply(values, load_yaml_config(source_file), sources, source_file)
    apply(values, overrides, sources, CLI)
    cfg = TrainConfig(**values)
    return validate(cfg, sources, shape=cfg.init_from == "scratch"), sources


# Keys a checkpoint never decides: how this command starts, what it may trust, where it writes and what it publishes
# (the folder being resumed into, the Hub, trackers' destinations). They come from this command and its YAML only,
# so a checkpoint made elsewhere (pulled from the Hub, copied from another machine) cannot redirect a run.
COMMAND_KEYS = ("out_dir", "eval_only", "allow_data_change", "trust_remote_code", "ddp_timeout",
                "push_to_hub", "hub_model_id", "hub_private", "hub_strategy", "hub_push_training_state",
                "wandb_log", "wandb_project", "wandb_run_name", "loggers")


def _in_use(key, saved, cfg):
    """Whether a COMMAND_KEYS change not asked for on the command line is worth a line: the destinations of what
    the run or this command publishes or logs to (not the permissions and start mode of this command)."""
    if key.startswith("hub_"):
        return saved.get("push_to_hub") or cfg.push_to_hub
    if key in ("wandb_project", "wandb_run_name"):
        return saved.get("wandb_log") or cfg.wandb_log or "wandb" in saved.get("loggers", []) + cfg.loggers
    return key in ("out_dir", "push_to_hub", "wandb_log", "loggers")


def resumed_config(saved, cfg, sources):
    """A resumed run keeps its own resolved config, changed only by the keys given on this command line; the
    COMMAND_KEYS are always this command's. How this command starts (init_from, resume_from) is not part of the run:
    the saved config keeps the run's own. Returns (config, sources, {key: (old, new, why)} for what changed)."""
    values = {k: v for k, v in saved.items() if k in FIELDS}  # a key added since the run started keeps its default
    merged_sources = {k: "the resumed run's train_config" for k in values}
    saved, changed = dict(values), {}
    for key in FIELDS:
        from_command = key in COMMAND_KEYS or sources.get(key) == CLI
        if not from_command or key in ("init_from", "resume_from"):
            continue
        old, new = values.get(key, getattr(TrainConfig(), key)), getattr(cfg, key)
        if old != new and (sources.get(key) == CLI or _in_use(key, saved, cfg)):
            changed[key] = (old, new, "from the command line" if sources.get(key) == CLI else
                            "this command's: a checkpoint never decides where a run writes or what it publishes")
        values[key] = new
        merged_sources[key] = sources.get(key, "the defaults")
    return validate(TrainConfig(**values), merged_sources), merged_sources, changed
