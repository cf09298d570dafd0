"""The house rules of docs/architecture.md, checked: no two modules import each other, no module over 450 lines
but the model file, a README that is a guide (at most 250 lines) whose every command line is valid as typed."""

import ast
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from nanogpt_hf.config import load_config

PACKAGE = os.path.join(ROOT, "nanogpt_hf")
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, "."), path


def _imports(module, path):
    """The package's modules this one imports (at the top or inside functions), as dotted names."""
    package = module.rsplit(".", 1)[0] if "." in module else ""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(target.removesuffix(".__init__"))
    return found


def test_no_two_modules_import_each_other():
    graph = {m: _imports(m, p) for m, p in _modules()}
    mutual = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, ()))
    assert not mutual, mutual


def test_no_module_over_450_lines_but_the_model():
    sizes = {m: sum(1 for _ in open(p, encoding="utf-8")) for m, p in _modules()}
    assert {m: n for m, n in sizes.items() if n > 450 and m != "modeling_nanogpt"} == {}


def test_the_readme_is_a_guide_of_at_most_250_lines():
    assert README.count("\n") <= 250
    assert README.split("\n## ")[1].startswith("Set up on a fresh machine")  # the two commands come first


def _readme_command_lines():
    """Every command line of the README: the lines of its bash blocks and the commands in its table cells."""
    lines = [ln for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S) for ln in block.splitlines()]
    lines += re.findall(r"\| `((?:accelerate|torchrun|python)[^`]*)` \|", README)
    return [ln.split("  #")[0].strip() for ln in lines if ln.strip() and not ln.startswith("bash setup.sh")]


def _trainer_args(words):
    """The trainer's own arguments of a command line that runs train_accelerate.py, or None."""
    if "train_accelerate.py" not in words:
        return None
    return words[words.index("train_accelerate.py") + 1:]


@pytest.mark.slow
def test_every_readme_command_line_is_valid_as_typed():
    """Trainer lines: the config loads and every value passes its checks (nothing is run); launch files exist;
    the data scripts exist; every flag of a nanogpt-* line is one its --help lists. (The lines themselves run in
    the tests of each tool; the two set-up commands are CI's.)"""
    lines = _readme_command_lines()
    helps, checked = _tool_helps({shlex.split(line)[0] for line in lines if line.startswith("nanogpt-")}), 0
    for line in lines:
        words = shlex.split(line)
        args = _trainer_args(words)
        if args is not None:
            if "..." in args:  # the 2-node row: the reader's own arguments
                args = args[: args.index("...")]
            if args != ["--help"]:
                load_config(args)
            for flag in ("--config_file",):
                if flag in words:
                    assert os.path.isfile(os.path.join(ROOT, words[words.index(flag) + 1])), line
        elif words[0] == "python" and words[1].endswith("prepare.py"):
            assert os.path.isfile(os.path.join(ROOT, words[1])), line
        elif words[0].startswith("nanogpt-"):
            for flag in (w.split("=")[0] for w in words[1:] if w.startswith("--")):
                assert flag in helps[words[0]], (line, flag)
        else:
            raise AssertionError(f"a README command line this test does not know how to check: {line}")
        checked += 1
    assert checked >= 15


def _tool_helps(tools):
    """{tool: its --help text}, each from `python -m nanogpt_hf.<module> --help` in its own process, all at once."""
    procs = {tool: subprocess.Popen([sys.executable, "-m", f"nanogpt_hf.{_MODULES[tool]}", "--help"], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
             for tool in tools}
    helps = {}
    for tool, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-1000:]
        helps[tool] = out
    return helps


_MODULES = {"nanogpt-sample": "sample", "nanogpt-eval": "evaluate", "nanogpt-plot": "plot", "nanogpt-export": "export",
            "nanogpt-serve": "serve", "nanogpt-bench": "bench", "nanogpt-prepare": "prepare", "nanogpt-hub": "hub"}
