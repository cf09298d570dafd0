"""Config files: which YAML a --config name means (a path, ./configs, the shipped ones, nanoGPT's config/NAME.py
habit), and reading one as a config needs it (no aliases, bounded nesting and size; `defaults: [model: NAME]`
presets merged underneath)."""

import os

import yaml

from .errors import UserError

__all__ = ["CONFIGS_DIR", "resolve_config_path", "read_yaml", "load_yaml_config", "yaml_value", "MAX_CONFIG_BYTES"]

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # shipped with the package


def resolve_config_path(name, config_path=None):
    """A YAML path from a path, or a name looked up in ./configs, then the configs shipped with the package.
    nanoGPT's habit `config/train_shakespeare_char.py` names the YAML of the same name."""
    if name.endswith(".py"):
        name = os.path.splitext(os.path.basename(name))[0]
    stem = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    candidates = [name] + [os.path.join(d, stem) for d in ([config_path] if config_path else []) + ["configs", CONFIGS_DIR]]
    for path in candidates:
        if os.path.isfile(path):
            return path
    available = sorted(f[:-5] for f in os.listdir(CONFIGS_DIR) if f.endswith(".yaml"))
    raise UserError(f"config {name!r} not found (looked in {', '.join(candidates)}); available: {', '.join(available)}")


class _ConfigLoader(yaml.SafeLoader):
    """YAML as a config needs it: no anchors or aliases (an alias bomb, a few lines that expand to billions of nodes
    or refer to themselves, hung the trainer) and at most MAX_DEPTH levels of nesting; refused while parsing."""

    MAX_DEPTH = 8
    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (& and *) are not allowed in a config",
                                              event.start_mark)
        if self._depth >= self.MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {self.MAX_DEPTH} levels",
                                              event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of keys; a bigger file is not one


def yaml_value(text):
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader, with aliases refused)


def read_yaml(path):
    """A YAML config file's mapping (anchors, aliases, deep nesting and huge files refused in one line)."""
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise UserError(f"{path}: {os.path.getsize(path):,} bytes is not a config (at most {MAX_CONFIG_BYTES:,})")
        with open(path, encoding="utf-8") as f:
            data = yaml_value(f)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{line}: {problem}") from e
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e.strerror})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def load_yaml_config(path):
    """The YAML's keys with its `defaults: [model: NAME]` presets merged underneath."""
    data = read_yaml(path)
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
        merged.update(read_yaml(preset))
    merged.update(data)
    return merged
