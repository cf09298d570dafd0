"""The typed training config: defaults, help, files and overrides, one-line refusals naming their source."""

import dataclasses
import os

import pytest
import yaml

from conftest import ROOT, assert_cli_error
from nanogpt_hf.config import TrainConfig, load_config, resumed_config
from nanogpt_hf.config_yaml import CONFIGS_DIR, resolve_config_path
from nanogpt_hf.errors import UserError
from nanogpt_hf.optim import get_lr
from nanogpt_hf.train import main as train_main


def test_every_key_has_a_type_a_default_and_help():
    for f in dataclasses.fields(TrainConfig):
        assert f.type in (int, float, bool, str, list), f.name
        assert f.metadata["help"].strip(), f.name
    cfg = TrainConfig()  # nanoGPT's train.py defaults (GPT-2 124M on OpenWebText)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size) == (12, 12, 768, 1024, 12)
    assert (cfg.learning_rate, cfg.min_lr, cfg.max_iters, cfg.gradient_accumulation_steps) == (6e-4, 6e-5, 600000, 40)


def test_help_lists_every_key_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}  (" in out and f.metadata["help"] in out, f.name
    assert "train_shakespeare_char_cpu" in out  # the shipped configs are named


def test_lr_schedule_is_nanogpts():
    cfg = TrainConfig(decay_lr=True, learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=100)
    assert get_lr(0, cfg) == pytest.approx(1e-3 / 11)
    assert get_lr(10, cfg) == pytest.approx(1e-3)
    assert get_lr(55, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert get_lr(100, cfg) == pytest.approx(1e-4) and get_lr(1000, cfg) == 1e-4
    assert get_lr(3, dataclasses.replace(cfg, decay_lr=False)) == 1e-3


def test_file_then_command_line_and_sources():
    cfg, sources = load_config(["--config", "train_shakespeare_char_cpu", "--max_iters=50", "--learning_rate", "1e-3"])
    assert (cfg.n_layer, cfg.block_size, cfg.max_iters, cfg.learning_rate) == (4, 64, 50, 1e-3)
    assert sources["max_iters"] == "command line" and sources["n_layer"].endswith("train_shakespeare_char_cpu.yaml")
    assert "dropout" in sources and "seed" not in sources  # set by the file / left at its default


@pytest.mark.parametrize("name", ["config/train_shakespeare_char.py", "train_shakespeare_char", "train_shakespeare_char.yaml"])
def test_nanogpt_style_config_names(name):
    assert resolve_config_path(name) == os.path.join(CONFIGS_DIR, "train_shakespeare_char.yaml")


def test_the_seeds_config_path_and_name_flags():
    cfg, sources = load_config([f"--config-path={CONFIGS_DIR}", "--config-name=train_shakespeare_char_cpu", "--n_layer=1"])
    assert cfg.n_embd == 128 and cfg.n_layer == 1 and sources["n_embd"].endswith("train_shakespeare_char_cpu.yaml")


def test_configs_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: the configs ship with the package
    cfg, _ = load_config(["config/train_shakespeare_char.py"])
    assert cfg.n_layer == 6 and cfg.out_dir == "out-shakespeare-char"


BAD_VALUES = [
    (["--learning_rat=1e-3"], "command line: unknown key 'learning_rat'; did you mean 'learning_rate'?"),
    (["--batch_size=twelve"], "command line: batch_size must be int"),
    (["--dropout=yes"], "dropout must be float"),
    (["--learning_rate=nan"], "command line: learning_rate must be a finite number"),
    (["--weight_decay=nan"], "weight_decay must be a finite number"),
    (["--grad_clip=nan"], "grad_clip must be a finite number"),
    (["--learning_rate=inf"], "learning_rate must be a finite number"),
    (["--beta1=2"], "command line: beta1 must be in [0, 1)"),
    (["--beta2=-0.5"], "beta2 must be in [0, 1)"),
    (["--seed=100000000000000000000000"], "seed must be in [0, 2**32)"),
    (["--seed=-1"], "seed must be in [0, 2**32)"),
    (["--min_lr=1e-2", "--learning_rate=1e-3"], "command line: min_lr (0.01) is above learning_rate (0.001)"),
    (["--out_dir="], "command line: out_dir is empty"),
    (["--n_layer=0"], "n_layer must be positive"),
    (["--n_embd=100", "--n_head=3"], "n_embd (100) must be divisible by n_head (3)"),
    (["--dropout=1.0"], "dropout must be in [0, 1)"),
    (["--dtype=float8"], "dtype must be one of"),
    (["--max_iters"], "--max_iters needs a value"),
    (["--config", "no_such_config"], "config 'no_such_config' not found"),
    (["--loggers=mlflow"], "unknown logger 'mlflow'"),
    (["--push_to_hub=true"], "push_to_hub needs hub_model_id"),
    (["--data_source=streaming"], "needs either stream_dataset"),
    (["--data_source=streaming", "--stream_files=a.txt"], "--stream_val_files"),
    (["extra", "positional"], "unexpected argument 'positional'"),
]


@pytest.mark.parametrize("argv, message", BAD_VALUES)
def test_bad_values_are_one_line_naming_their_source(argv, message, capsys):
    assert_cli_error(train_main, argv, message, capsys)


def test_bad_value_in_a_file_names_the_file(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("learning_rate: .nan\nmax_iters: 10\n")
    assert_cli_error(train_main, ["--config", str(path)], f"{path}: learning_rate must be a finite number", capsys)
    path.write_text("beta2: 1.5\n")
    assert_cli_error(train_main, ["--config", str(path)], f"{path}: beta2 must be in [0, 1)", capsys)
    path.write_text("n_layer: 4\n  n_head: [oops\n")
    assert_cli_error(train_main, ["--config", str(path)], "malformed YAML at line 2", capsys)


def test_resume_keeps_the_runs_config_and_takes_only_command_line_keys():
    saved = TrainConfig(learning_rate=3e-3, max_iters=100, n_layer=4, out_dir="out-shakespeare-char").to_dict()
    cfg, sources = load_config(["--config", "train_shakespeare_char_cpu", "--max_iters=200"])  # YAML says 3e-3 too
    cfg = dataclasses.replace(cfg, learning_rate=1e-3)  # as if the YAML had been edited since
    merged, _, changed = resumed_config(saved, cfg, sources)
    assert merged.learning_rate == 3e-3 and merged.max_iters == 200  # the YAML does not revert the run's values
    assert changed == {"max_iters": (100, 200, "from the command line")}
    with pytest.raises(UserError, match="min_lr"):
        resumed_config(saved, *load_config(["--min_lr=1.0"]))


def test_a_checkpoints_config_never_decides_where_the_run_writes_or_what_it_publishes():
    """A training state made elsewhere (pulled from the Hub, copied from another machine) names another out_dir, a
    public push and W&B: the resume command's own values win, and the changes that matter are printed."""
    saved = TrainConfig(out_dir="/elsewhere", push_to_hub=True, hub_model_id="someone/else", hub_private=False,
                        wandb_log=True, wandb_project="theirs", trust_remote_code=True, allow_data_change=True,
                        learning_rate=3e-3).to_dict()
    cfg, sources = load_config(["--init_from=resume", "--out_dir=mine"])
    merged, _, changed = resumed_config(saved, cfg, sources)
    assert (merged.out_dir, merged.push_to_hub, merged.hub_model_id, merged.hub_private) == ("mine", False, "", True)
    assert (merged.wandb_log, merged.wandb_project, merged.trust_remote_code, merged.allow_data_change) == (
        False, "owt", False, False)
    assert merged.learning_rate == 3e-3  # what defines the run stays the checkpoint's
    assert set(changed) == {"out_dir", "push_to_hub", "hub_model_id", "hub_private", "wandb_log", "wandb_project"}
    assert "never decides" in changed["push_to_hub"][2] and changed["out_dir"][2] == "from the command line"


def test_every_shipped_config_loads():
    for name in sorted(f[:-5] for f in os.listdir(CONFIGS_DIR) if f.endswith(".yaml")):
        cfg, _ = load_config(["--config", name])
        assert cfg.out_dir, name
    with open(os.path.join(ROOT, "accelerate_configs", "cpu_ddp.yaml")) as f:
        assert yaml.safe_load(f)["num_processes"] == 2
