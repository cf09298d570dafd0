"""Every Python snippet in the README runs as pasted, after the main job (out-shakespeare-char exists)."""

import os
import re

import pytest

from conftest import ROOT, run_python, tiny_model
from nanogpt_hf.model_io import save_model_folder
from nanogpt_hf.tokenization import char_tokenizer

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def after_main_job(tmp_path_factory):
    """A working directory holding out-shakespeare-char, as quickstart.sh leaves it (a small model, the same
    64-character context and char tokenizer)."""
    cwd = tmp_path_factory.mktemp("reader")
    text = open(os.path.join(ROOT, "nanogpt_hf", "assets", "tinyshakespeare", "input.txt"), encoding="utf-8").read()
    tok = char_tokenizer(sorted(set(text)), model_max_length=64)
    save_model_folder(tiny_model(vocab_size=len(tok), block_size=64, seed=9), tok, str(cwd / "out-shakespeare-char"))
    return cwd


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_pasted(index, after_main_job):
    """Each snippet as pasted, its output captured (not a terminal): it runs, and no progress bar ("Loading weights
    0%...100%" around from_pretrained) is printed into a log."""
    proc = run_python(SNIPPETS[index], cwd=str(after_main_job))
    assert proc.returncode == 0
    assert "Loading weights" not in proc.stderr and "it/s]" not in proc.stderr, proc.stderr[-2000:]
