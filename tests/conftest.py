import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# two threads, split between pytest-xdist's workers (PYTEST_XDIST_WORKER_COUNT): more would only contend for 2 cores
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
# fp32 rounding between two computations of the same logits (reduction order, kernel choice): ~1e-7 seen
FP32_RTOL, FP32_ATOL = 1e-5, 1e-5


def assert_greedy_choices(chosen, reference_logits, margin=1e-4):
    """chosen (...) token ids are greedy choices under reference_logits (..., V): each one's logit within margin of
    the best. Two computations of the same function round differently on another CPU (~1e-6), which may swap a
    near-tie and everything decoded after it; a choice further than margin from the best is a real difference."""
    picked = reference_logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    shortfall = (reference_logits.max(-1).values - picked).max().item()
    assert shortfall <= margin, f"a choice {shortfall:.2e} below the reference's best"


def assert_greedy_sequence(sequence, start, reference):
    """sequence (B, T): every token from position start on is a greedy choice of the reference model given the
    tokens before it (teacher forcing: one forward of the reference over the sequence)."""
    with torch.no_grad():
        logits = reference(sequence).logits[:, start - 1 : -1]  # the predictions for positions start..T-1
    assert_greedy_choices(sequence[:, start:], logits)


def tiny_config(**overrides):
    from nanogpt_hf import NanoGPTConfig

    args = dict(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    args.update(overrides)
    return NanoGPTConfig(**args)


def tiny_model(seed=0, **overrides):
    from nanogpt_hf import NanoGPTForCausalLM

    torch.manual_seed(seed)
    return NanoGPTForCausalLM(tiny_config(**overrides)).eval()


# Code run first in a subprocess that must not see nanogpt_hf: drops the editable-install finder and the
# project from sys.path, then proves the package is not importable.
HIDE_PACKAGE = textwrap.dedent(
    f"""
    import importlib.util, sys
    sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", type(f).__module__).lower()
                     and "editable" not in type(f).__name__.lower()]
    sys.path = [p for p in sys.path if p not in ("", ".", {ROOT!r}) and not p.startswith({ROOT + os.sep!r})]
    assert importlib.util.find_spec("nanogpt_hf") is None, "nanogpt_hf is still importable"
    """
)


def run_python(code, *, hide_package=False, cwd=None, env=None, timeout=300, check=True):
    """Runs code in a fresh interpreter; returns the CompletedProcess (stdout/stderr as text)."""
    full = (HIDE_PACKAGE if hide_package else "") + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", full], cwd=cwd or ROOT, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cli(args, *, cwd=None, env=None, timeout=600):
    """Runs a command line; returns the CompletedProcess without checking the exit code."""
    return subprocess.run(
        args, cwd=cwd or ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def tiny():
    return tiny_model()


def assert_one_line_error(proc, message):
    """A user mistake: exit code 2, no traceback, one `error:` line (the last) that contains message."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]


def assert_cli_error(main, argv, message, capsys):
    """The same check in-process: a console entry point called with argv exits 2 with one `error:` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, (argv, err)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], (argv, err)


# ---------------------------------------------------------------------------------------- training helpers
TRAIN = os.path.join(ROOT, "train_accelerate.py")
TINY = ["--config", "train_shakespeare_char_cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=4", "--log_interval=1", "--warmup_iters=5"]


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    from nanogpt_hf.prepare import prepare_shakespeare_char

    path = tmp_path_factory.mktemp("data") / "shakespeare_char"
    prepare_shakespeare_char(str(path))
    return str(path)


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory):
    from nanogpt_hf.prepare import prepare_shakespeare

    path = tmp_path_factory.mktemp("data") / "shakespeare"
    prepare_shakespeare(str(path))
    return str(path)


def train_args(out_dir, data_dir, *extra):
    """A tiny model on the quickstart config: seconds per run."""
    return [*TINY, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra]


def run_train(out_dir, data_dir, *extra, launcher=(), env=None, check=True):
    """train_accelerate.py in a real process, plain or under a launcher (accelerate launch, torchrun)."""
    cmd = [*launcher, *([] if launcher else [sys.executable]), TRAIN, *train_args(out_dir, data_dir, *extra)]
    proc = run_cli(cmd, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["iter"]: r["train/loss"] for r in read_log(out_dir) if "train/loss" in r}


def start_train(out_dir, data_dir, *extra, launcher=None, env=None):
    """train_accelerate.py started in the background (a session of its own, output piped), plain or under a
    launcher."""
    cmd = [*(launcher or [sys.executable]), TRAIN, *train_args(out_dir, data_dir, *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})


def wait_for_iter(out_dir, n, proc, timeout=180):
    """Polls the journal until the run has logged training step n."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if any(r.get("iter", -1) >= n and "train/loss" in r for r in read_log(out_dir)):
                return
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"iteration {n} not reached")


def alive(out_dir, timeout):
    """Waits up to timeout s for the processes of the run in out_dir (their command lines name it) to end; returns
    the pids still alive. (`--`: the pattern starts with a dash, which pgrep would take for an option.)"""
    import time

    deadline = time.time() + timeout
    while True:
        pids = subprocess.run(["pgrep", "-f", "--", f"--out_dir={out_dir}"], capture_output=True, text=True).stdout.split()
        if not pids or time.time() > deadline:
            return pids
        time.sleep(0.2)


def same_weights(a, b):
    """Whether two model folders hold bit-identical weights (a resumed run against the same run uninterrupted)."""
    from safetensors.torch import load_file

    wa, wb = (load_file(os.path.join(folder, "model.safetensors")) for folder in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# HellaSwag's schema (rowanz/hellaswag jsonl), an ActivityNet row and WikiHow rows with their bracket artifacts
HELLASWAG_ROWS = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3, "source_id": "a",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 92, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow a lemon tree [title] Pick a pot.",
     "ctx_b": "[step] Lemon trees need room for roots.", "split": "val", "split_type": "zeroshot", "label": 1,
     "ctx": "[header] How to grow a lemon tree [title] Pick a pot. [step] Lemon trees need room for roots.",
     "source_id": "b", "endings": ["[substeps] Water it  twice a year.", "Choose a pot that is wide [title] and deep.",
                                   "Sing to the tree.", "[step] Paint the pot blue."]},
    {"ind": 7, "activity_label": "Personal Care and Style", "ctx_a": "[header] How to braid hair [title] Brush it.",
     "ctx_b": "then split it in three", "ctx": "[header] How to braid hair [title] Brush it. then split it in three",
     "split": "val", "split_type": "indomain", "label": 0, "source_id": "c",
     "endings": ["sections [step] and cross them over.", "cars.", "[title] Eat lunch.", "the moon  sings."]},
]


def decisive(model, seed=0):
    """Weights away from their init, so that each position's top logit stands clear of the next (a near-uniform
    model's argmax would flip on any rounding)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model
