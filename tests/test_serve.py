"""Serve and ship: the GGUF file (read back by transformers' own GGUF loader, an independent reader of ggml's format)
and nanogpt-serve (transformers' own server, asked with plain HTTP on 127.0.0.1; its folder, loaded as the server
loads it in an interpreter without this package)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import (
    FP32_ATOL,
    FP32_RTOL,
    ROOT,
    assert_cli_error,
    assert_greedy_choices,
    assert_greedy_sequence,
    decisive,
    run_python,
    tiny_model,
    train_args,
)
from nanogpt_hf import serve
from nanogpt_hf.errors import UserError
from nanogpt_hf.model_io import load_model_and_tokenizer, save_model_folder
from nanogpt_hf.tokenization import char_tokenizer, gpt2_hf_tokenizer
from nanogpt_hf.train import main as train_main

TEXT = "ROMEO: But soft, what light\nthrough yonder window breaks? 3 & $ -- ok;"
CHARS = sorted(set(open(os.path.join(ROOT, "nanogpt_hf", "assets", "tinyshakespeare", "input.txt")).read()))
# what the dtype allows between our logits and the file's, for these decisive models (|logits| ~ 10)
TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "q8_0": 0.25}  # measured: 4e-6, 6e-3, 0.07


def read_gguf(path):
    """transformers' GGUF reader, as a user calls it. transformers 5.25 reads a GGUF file's context length into
    GPT2Config.n_ctx, while GPT-2's position table is sized by n_positions (1024 by default): set it from the file."""
    folder, name = os.path.split(path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.n_positions = config.n_ctx
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def export_and_compare(folder, tmp_path, dtype):
    from nanogpt_hf.export import main as export_main

    ours, tok = load_model_and_tokenizer(str(folder))
    path = str(tmp_path / f"model-{dtype}.gguf")
    export_main([str(folder), path, "--format", "gguf", "--dtype", dtype])
    theirs, their_tok = read_gguf(path)
    assert type(theirs).__name__ == "GPT2LMHeadModel" and theirs.config.activation_function == "gelu_new"
    ids = tok(TEXT).input_ids
    assert their_tok(TEXT).input_ids == ids and their_tok.decode(ids) == TEXT  # the same vocabulary, both ways
    x = torch.tensor([ids[: ours.config.block_size], ids[-ours.config.block_size:]])
    # the file computes GPT-2's tanh GELU: against our model in that form, only the dtype's rounding is left; against
    # the model as trained (the exact GELU), the same argmax
    tanh = type(ours)(type(ours.config).from_dict({**ours.config.to_dict(), "activation_function": "gelu_new"}))
    tanh.load_state_dict(ours.state_dict())
    with torch.no_grad():
        a, same_function, b = ours.eval()(x).logits, tanh.eval()(x).logits, theirs(x).logits
    assert (same_function - b).abs().max().item() < TOLERANCE[dtype], (dtype, (same_function - b).abs().max().item())
    assert_greedy_choices(a.argmax(-1), b)
    return path


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_a_char_models_gguf_loads_in_transformers_with_the_same_argmax(tmp_path, dtype):
    """The char vocabulary travels as byte-level symbols with one inert merge; the model (trained with nanoGPT's
    exact GELU) is read as GPT-2 with the tanh GELU, within what the dtype and the GELU form allow."""
    tok = char_tokenizer(CHARS, model_max_length=32)
    save_model_folder(decisive(tiny_model(vocab_size=len(tok), activation_function="gelu")), tok, str(tmp_path / "m"))
    path = export_and_compare(tmp_path / "m", tmp_path, dtype)
    assert os.path.getsize(path) < {"f32": 200_000, "f16": 110_000, "q8_0": 80_000}[dtype]


@pytest.mark.slow
def test_a_bpe_models_gguf_loads_in_transformers_with_the_same_argmax(tmp_path):
    """GPT-2's 50257 tokens and 50000 merges, padded to the model's 50304 rows; an untied head is written as
    llama.cpp's `output`."""
    tok = gpt2_hf_tokenizer(32)
    model = decisive(tiny_model(vocab_size=50304, activation_function="gelu_new", tie_word_embeddings=False, bias=True))
    save_model_folder(model, tok, str(tmp_path / "m"))
    export_and_compare(tmp_path / "m", tmp_path, "f16")


def test_gguf_export_refuses_what_gpt2_cannot_compute_and_never_overwrites(tmp_path, capsys):
    from conftest import assert_cli_error
    from nanogpt_hf.export import main as export_main

    tok = char_tokenizer(CHARS, model_max_length=32)
    save_model_folder(tiny_model(vocab_size=len(tok), position_embedding="rope"), tok, str(tmp_path / "rope"))
    assert_cli_error(export_main, [str(tmp_path / "rope"), str(tmp_path / "r.gguf"), "--format", "gguf"],
                     "cannot export to GGUF (llama.cpp's GPT-2)", capsys)
    assert not os.listdir(tmp_path / "rope") == [] and not (tmp_path / "r.gguf").exists()
    (tmp_path / "taken.gguf").write_text("mine")
    assert_cli_error(export_main, [str(tmp_path / "rope"), str(tmp_path / "taken.gguf"), "--format", "gguf"],
                     "exists: choose a new file name", capsys)
    assert (tmp_path / "taken.gguf").read_text() == "mine"
    # a destination that cannot be: one line, before the model loads (c38e359: a traceback after loading)
    (tmp_path / "a-file").write_text("mine")
    for dest, message in ((tmp_path / "missing" / "x.gguf", "the folder"), (tmp_path / "a-file" / "x.gguf", "is a file")):
        assert_cli_error(export_main, [str(tmp_path / "nowhere"), str(dest), "--format", "gguf"], message, capsys)
    (tmp_path / "mine.Modelfile").write_text("mine")  # the Modelfile the export would write beside mine.gguf
    assert_cli_error(export_main, [str(tmp_path / "nowhere"), str(tmp_path / "mine.gguf"), "--format", "gguf"],
                     "mine.Modelfile exists", capsys)


@pytest.mark.slow
def test_two_gguf_exports_to_one_name_write_one_file_and_leave_a_users_partial_file_alone(tmp_path):
    """Two nanogpt-export processes started together toward one DEST: one writes it (and its Modelfile with the
    model's context), the other stops in one line; DEST.partial, a user's file, is left as it was (c38e359 wrote
    its temporary file there and deleted it)."""
    tok = char_tokenizer(CHARS, model_max_length=48)
    save_model_folder(tiny_model(vocab_size=len(tok), block_size=48), tok, str(tmp_path / "m"))
    dest = tmp_path / "baby.gguf"
    (tmp_path / "baby.gguf.partial").write_text("mine")
    cmd = [sys.executable, "-m", "nanogpt_hf.export", str(tmp_path / "m"), str(dest), "--format", "gguf"]
    exports = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    results = sorted(((p.wait(timeout=300), *p.communicate()) for p in exports), key=lambda r: r[0])
    (ok, out, _), (failed, _, err) = results
    assert ok == 0 and failed == 2, results
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ") and str(dest) in err
    assert "-c 48" in out and read_gguf(str(dest))[0].config.n_ctx == 48
    assert (tmp_path / "baby.Modelfile").read_text().splitlines()[1:] == [
        "FROM ./baby.gguf", 'TEMPLATE "{{ .Prompt }}"', "PARAMETER num_ctx 48"]
    assert (tmp_path / "baby.gguf.partial").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["baby.Modelfile", "baby.gguf", "baby.gguf.partial", "m"]


# ------------------------------------------------------------------------------------------ nanogpt-serve
def _post(port, body, stream=False):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read().decode()
    if not stream:
        return json.loads(raw)["choices"][0]["text"]
    chunks = [json.loads(line[len("data: "):]) for line in raw.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    return "".join(c["choices"][0]["text"] for c in chunks), len(chunks)


def rope_rmsnorm_folder(folder):
    """A model folder whose model GPT-2 cannot compute (RMSNorm, rotary positions, no biases), char vocabulary."""
    tok = char_tokenizer(CHARS, model_max_length=32)
    model = tiny_model(vocab_size=len(tok), norm="rmsnorm", position_embedding="rope", bias=False)
    save_model_folder(decisive(model), tok, str(folder))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, char_data, bpe_data):
    root = tmp_path_factory.mktemp("serve")
    for name, data in (("char", char_data), ("bpe", bpe_data)):
        train_main(train_args(root / name, data, "--max_iters=20", "--eval_interval=20", "--eval_iters=2"))
    rope_rmsnorm_folder(root / "rope")
    return root


def assert_greedy_text(served, expected, model, tok, prompt):
    """The served completion is greedy generate's text; where it is not (the server's generate call, with an
    attention mask, is another computation of the logits, and a near-tie may swap on another CPU), each of its
    tokens is a greedy choice of our model within assert_greedy_choices' margin."""
    if served != expected:
        prompt_ids = tok(prompt).input_ids
        assert_greedy_sequence(torch.tensor([tok(prompt + served).input_ids]), len(prompt_ids), model)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["char", "bpe", "rope"])
def test_nanogpt_serve_answers_completions_as_greedy_generate_does(runs, tmp_path, kind):
    """A freshly trained run (char, BPE) or a model GPT-2 cannot compute (rope), served through transformers'
    server: /v1/completions at temperature 0 returns the text greedy generate makes, streamed or not, for the model
    named by its served folder or its run's folder name; a request for another model is refused (the server is
    pinned to the folder whose code it trusts); SIGTERM stops it."""
    out, port = runs / kind, serve.free_port()
    ours, tok = load_model_and_tokenizer(str(out))
    prompt = "ROMEO:"
    ids = torch.tensor([tok(prompt).input_ids])
    expected = tok.decode(ours.eval().generate(ids, max_new_tokens=12, do_sample=False)[0, ids.size(1):])
    env = {**os.environ, "NANOGPT_HF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "nanogpt_hf.serve", str(out), "--port", str(port)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            serve.wait_until_serving(port, server, timeout=120)
        except RuntimeError:
            server.kill()
            raise AssertionError(server.stdout.read()[-3000:]) from None
        (folder,) = os.listdir(tmp_path / "cache" / "serve")  # the served folder, keyed by the weights and code
        body = {"model": str(tmp_path / "cache" / "serve" / folder), "prompt": prompt, "max_tokens": 12,
                "temperature": 0}
        assert_greedy_text(_post(port, body), expected, ours, tok, prompt)
        streamed, chunks = _post(port, {**body, "stream": True}, stream=True)
        assert_greedy_text(streamed, expected, ours, tok, prompt)
        assert chunks >= 2
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post(port, {**body, "model": "gpt2"})
        assert refused.value.code // 100 == 4 and "pinned" in refused.value.read().decode()
        assert_greedy_text(_post(port, {**body, "model": kind}), expected, ours, tok, prompt)  # the run's name
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode is not None


@pytest.mark.slow
def test_the_served_folder_loads_as_transformers_server_loads_it_without_this_package(tmp_path, monkeypatch):
    """nanogpt-serve's folder names no architecture and carries this package's model code and a stock tokenizer, so
    AutoModelForCausalLM under trust_remote_code (what transformers' server runs for such a config) builds our model
    in an interpreter that cannot import nanogpt_hf, for a model GPT-2 cannot compute too, with our logits. It is
    written once per version of any file that defines the model (config, tokenizer, weights) and of the code."""
    monkeypatch.setenv("NANOGPT_HF_CACHE", str(tmp_path / "cache"))
    source = str(rope_rmsnorm_folder(tmp_path / "m"))
    folder = serve.served_folder(source)
    assert serve.served_folder(source) == folder  # written once
    assert os.listdir(tmp_path / "cache" / "serve") == [os.path.basename(folder)]
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert "architectures" not in config and config["auto_map"]["AutoModelForCausalLM"].endswith("NanoGPTForCausalLM")
    assert {"modeling_nanogpt.py", "cpu_decoding.py", "kv_cache.py"} <= set(os.listdir(folder))
    ours, tok = load_model_and_tokenizer(source)
    ids = tok(TEXT[:30]).input_ids
    with torch.no_grad():
        expected = ours.eval()(torch.tensor([ids])).logits[0]
    proc = run_python(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True).eval()
        ids = AutoTokenizer.from_pretrained({folder!r}, trust_remote_code=True)({TEXT[:30]!r}).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        print(json.dumps(dict(cls=type(model).__name__, ids=ids, logits=logits.tolist())))
    """, hide_package=True, env={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cls"] == "NanoGPTForCausalLM" and got["ids"] == ids
    torch.testing.assert_close(torch.tensor(got["logits"]), expected, rtol=FP32_RTOL, atol=FP32_ATOL)
    # a copy with one head where the run had two (same weights), or with another tokenizer: another served folder,
    # holding that config and those files (c38e359 served the original for both)
    edited = shutil.copytree(source, tmp_path / "edited")
    config_path = edited / "config.json"
    config = json.loads(config_path.read_text())
    config["n_head"] = config["n_head"] // 2
    config_path.write_text(json.dumps(config))
    edited_folder = serve.served_folder(str(edited))
    assert edited_folder != folder and json.loads(open(os.path.join(edited_folder, "config.json")).read())["n_head"] == config["n_head"]
    retokenized = shutil.copytree(source, tmp_path / "retokenized")
    char_tokenizer("abc\n ").save_pretrained(retokenized)
    retokenized_folder = serve.served_folder(str(retokenized))
    assert retokenized_folder not in (folder, edited_folder)
    (retokenized / "notes.txt").write_text("a file that is not the model's")  # changes nothing
    assert serve.served_folder(str(retokenized)) == retokenized_folder
    assert len(os.listdir(tmp_path / "cache" / "serve")) == 3
    code = serve._model_code_files()
    monkeypatch.setattr(serve, "_model_code_files", lambda: [*code, __file__])  # another version of the code
    assert serve.served_folder(source) != folder


def test_nanogpt_serve_says_what_it_needs_in_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match=r"needs transformers>=5\.25.*this is 5\.24\.0"):
        serve._check_serving_installed("5.24.0")
    serve._check_serving_installed("5.25.0")
    serve._check_serving_installed("6.0.0.dev0")
    free = ["--port", str(serve.free_port())]  # the port is checked first
    assert_cli_error(serve.main, [str(tmp_path / "nothing"), *free], "no such folder", capsys)
    (tmp_path / "empty").mkdir()
    assert_cli_error(serve.main, [str(tmp_path / "empty"), *free],
                     "not a complete model folder (no config.json and no model.safetensors)", capsys)
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")  # weights alone: not served as some other model
    assert_cli_error(serve.main, [str(tmp_path / "empty"), *free], "not a complete model folder (no config.json)",
                     capsys)
    assert_cli_error(serve.main, [str(tmp_path / "empty"), "--port", "0"], "a port is 1-65535", capsys)
    with socket.socket() as taken:  # a port another server holds: one line, before any model is looked at
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_cli_error(serve.main, [str(tmp_path / "nothing"), "--port", str(port)],
                         f"--port {port}: cannot listen on 127.0.0.1:{port}", capsys)
