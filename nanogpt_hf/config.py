"""Training configuration: nanoGPT's hyperparameter names and defaults, YAML files, type-checked overrides.

Resolution order (later wins): DEFAULTS below < model preset named in the YAML's `defaults: [model: NAME]` <
the YAML file < command-line `--key=value` overrides. Unknown keys are rejected with the closest valid key;
every value is checked against the type of its default. The resolved config is saved with every run.
"""

import difflib
import os

import yaml

from .configuration_nanogpt import ACTIVATIONS
from .errors import UserError

__all__ = ["DEFAULTS", "load_config", "parse_cli", "resolve_config_path", "validate", "public_config"]

# ----------------------------------------------------------------------------------------------- defaults
# default config values designed to train a gpt2 (124M) on OpenWebText (nanoGPT's train.py)
DEFAULTS = dict(
    # I/O
    out_dir="out",
    eval_interval=2000,
    log_interval=1,
    eval_iters=200,
    eval_only=False,  # if True, script exits right after the first eval
    always_save_checkpoint=True,  # if True, always save a checkpoint after each eval
    init_from="scratch",  # 'scratch' | 'resume' | 'auto' (resume if out_dir has a checkpoint) | 'gpt2*' | folder | hub id
    resume_from="",  # init_from=resume: a checkpoint folder, an out_dir or a hub id (default: this out_dir)
    keep_last=2,  # checkpoints kept besides the best one
    # data
    dataset="openwebtext",  # data/<dataset>/ with train.bin, val.bin, meta.json (prepare.py)
    data_dir="",  # explicit folder instead of data/<dataset>
    data_source="memmap",  # 'memmap' (prepared bins) | 'streaming' (tokenize a datasets dataset on the fly)
    stream_dataset="",  # streaming: a datasets name ...
    stream_files=[],  # ... or local .txt/.jsonl/.parquet files
    stream_val_files=[],  # streaming: held-out files for evaluation (else the stream's val split)
    stream_split="train",
    stream_val_split="validation",
    stream_text_column="text",
    gradient_accumulation_steps=5 * 8,  # used to simulate larger batch sizes (total over all processes)
    batch_size=12,  # if gradient_accumulation_steps > 1, this is the micro-batch size
    block_size=1024,
    # model
    n_layer=12,
    n_head=12,
    n_embd=768,
    dropout=0.0,  # for pretraining 0 is good, for finetuning try 0.1+
    bias=False,  # do we use bias inside LayerNorm and Linear layers?
    activation_function="gelu",  # nanoGPT's exact GELU; 'gelu_new' is GPT-2's tanh one (4x slower kernel on CPU)
    # adamw optimizer
    learning_rate=6e-4,  # max learning rate
    max_iters=600000,  # total number of training iterations
    weight_decay=1e-1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # clip gradients at this value, or disable if == 0.0
    # learning rate decay settings
    decay_lr=True,  # whether to decay the learning rate
    warmup_iters=2000,  # how many steps to warm up for
    lr_decay_iters=600000,  # should be ~= max_iters per Chinchilla
    min_lr=6e-5,  # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
    # system
    device="auto",  # 'auto' | 'cpu' | 'cuda': Accelerate places everything; 'cpu' forces the CPU
    dtype="auto",  # 'auto' (bf16 where supported, else fp16 on GPU, fp32 on CPU) | 'float32' | 'bfloat16' | 'float16'
    compile=False,  # torch.compile the model (nanoGPT's default is True; falls back with a warning)
    seed=1337,
    max_bad_steps=10,  # non-finite loss/gradient steps in a row before the run stops
    # logging
    wandb_log=False,  # disabled by default
    wandb_project="owt",
    wandb_run_name="gpt2",
    loggers=[],  # more trackers: 'wandb', 'tensorboard' (log.jsonl in out_dir is always written)
    # hub
    push_to_hub=False,
    hub_model_id="",
    hub_private=True,
    hub_strategy="end",  # 'end' | 'every_save'
    hub_push_training_state=False,
)

CHOICES = dict(
    activation_function=ACTIVATIONS,
    data_source=("memmap", "streaming"),
    device=("auto", "cpu", "cuda"),
    dtype=("auto", "float32", "bfloat16", "float16"),
    hub_strategy=("end", "every_save"),
)
POSITIVE = ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size", "block_size",
            "n_layer", "n_head", "n_embd", "max_bad_steps")
NON_NEGATIVE = ("max_iters", "keep_last", "learning_rate", "weight_decay", "grad_clip", "warmup_iters",
                "lr_decay_iters", "min_lr")
LOGGERS = ("wandb", "tensorboard")


# ----------------------------------------------------------------------------------------------- files
def _repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_config_path(name, config_path=None):
    """A YAML path from a path, or a name looked up in configs/ (here, then next to the package)."""
    candidates = [name]
    stem = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    for folder in ([config_path] if config_path else []) + ["configs", os.path.join(_repo_root(), "configs")]:
        candidates.append(os.path.join(folder, stem))
    for path in candidates:
        if os.path.isfile(path):
            return path
    available = sorted(f[:-5] for f in os.listdir(os.path.join(_repo_root(), "configs")) if f.endswith(".yaml")) \
        if os.path.isdir(os.path.join(_repo_root(), "configs")) else []
    raise UserError(f"config {name!r} not found (looked in {', '.join(candidates)}); available: {', '.join(available)}")


def _read_yaml(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{line}: {problem}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def _load_yaml_config(path):
    """The YAML's keys with its `defaults: [model: NAME]` presets merged underneath."""
    data = _read_yaml(path)
    merged = {}
    defaults = data.pop("defaults", []) or []
    if not isinstance(defaults, list):
        raise UserError(f"{path}: `defaults` must be a list like [model: gpt2-xl]")
    for entry in defaults:
        if not (isinstance(entry, dict) and len(entry) == 1):
            raise UserError(f"{path}: each `defaults` entry must be `group: name`, e.g. `model: gpt2-xl`")
        (group, name), = entry.items()
        preset = os.path.join(os.path.dirname(os.path.abspath(path)), group, f"{name}.yaml")
        if not os.path.isfile(preset):
            raise UserError(f"{path}: preset {group}/{name} not found ({preset})")
        merged.update(_read_yaml(preset))
    merged.update(data)
    return merged


# ----------------------------------------------------------------------------------------------- checks
def _suggest(key):
    close = difflib.get_close_matches(key, DEFAULTS, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else "; see DEFAULTS in nanogpt_hf/config.py"


def _coerce(key, value, source):
    """value checked against the type of DEFAULTS[key] (ints are accepted for floats)."""
    default = DEFAULTS[key]
    expected = type(default)
    if expected in (int, float) and isinstance(value, str):  # YAML 1.1 reads 6e-4 (no dot) as a string
        try:
            value = expected(value) if expected is float else int(value, 0)
        except ValueError:
            pass
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        ok = isinstance(value, list)
    else:  # str
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"{source}: {key} must be {expected.__name__} (like {default!r}), got {value!r}")
    return value


def validate(cfg, source="config"):
    for key in POSITIVE:
        if cfg[key] <= 0:
            raise UserError(f"{source}: {key} must be positive, got {cfg[key]}")
    for key in NON_NEGATIVE:
        if cfg[key] < 0:
            raise UserError(f"{source}: {key} must not be negative, got {cfg[key]}")
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            raise UserError(f"{source}: {key} must be one of {', '.join(choices)}; got {cfg[key]!r}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise UserError(f"{source}: n_embd ({cfg['n_embd']}) must be divisible by n_head ({cfg['n_head']})")
    if not 0 <= cfg["dropout"] < 1:
        raise UserError(f"{source}: dropout must be in [0, 1), got {cfg['dropout']}")
    for name in cfg["loggers"]:
        if name not in LOGGERS:
            raise UserError(f"{source}: unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
    if cfg["push_to_hub"] and not cfg["hub_model_id"]:
        raise UserError(f"{source}: push_to_hub needs hub_model_id (e.g. your-name/my-gpt)")
    return cfg


def _apply(cfg, updates, source):
    for key, value in updates.items():
        if key not in DEFAULTS:
            raise UserError(f"{source}: unknown key {key!r}{_suggest(key)}")
        cfg[key] = _coerce(key, value, source)


# ----------------------------------------------------------------------------------------------- CLI
def parse_cli(argv):
    """(config name or None, config_path or None, {key: value}) from `--config X --key=value --key value`.

    Also accepts the seed's `--config-path=DIR --config-name=NAME` and bare `key=value` (Hydra style)."""
    name, config_path, overrides = None, None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise SystemExit(_help())
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
        if key == "config" or key == "config_name":
            name = value
        elif key == "config_path":
            config_path = value
        else:
            try:
                overrides[key] = yaml.safe_load(value) if value != "" else ""
            except yaml.YAMLError:
                overrides[key] = value
        i += 1
    return name, config_path, overrides


def _help():
    lines = ["usage: train_accelerate.py [--config NAME_OR_PATH] [--key=value ...]", "", "keys and defaults:"]
    lines += [f"  --{k}={v!r}" for k, v in DEFAULTS.items()]
    return "\n".join(lines)


def public_config(cfg):
    """The config as saved and shown: without the bookkeeping keys (`_config_file`, `_explicit`)."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def load_config(argv=()):
    """The resolved config dict (plus `_config_file`) from command-line arguments."""
    name, config_path, overrides = parse_cli(list(argv))
    cfg = {k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()}  # lists copied, not shared
    source_file, explicit = None, set(overrides)
    if name:
        source_file = resolve_config_path(name, config_path)
        from_file = _load_yaml_config(source_file)
        _apply(cfg, from_file, source_file)
        explicit |= set(from_file)
    _apply(cfg, overrides, "command line")
    validate(cfg, source_file or "command line")
    cfg["_config_file"] = source_file
    cfg["_explicit"] = sorted(explicit)  # what the user set: on resume only these override the run's own config
    return cfg
