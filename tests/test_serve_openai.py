"""nanogpt-serve as clients use it: the `openai` package, lm-evaluation-harness's `local-completions`, raw HTTP. One
server (a real `nanogpt-serve` process, transformers' server underneath) on a small GPT-2-vocabulary model; each
answer is checked against the model itself in this process (its log_softmax, its greedy generate) or against
lm-eval's in-process `hf` backend."""

import glob
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
from fastapi import HTTPException

from conftest import HELLASWAG_ROWS, ROOT, assert_one_line_error, decisive, run_cli, tiny_model
from nanogpt_hf import serve
from nanogpt_hf.model_io import load_model_and_tokenizer, save_model_folder
from nanogpt_hf.serve_app import NanoGPTCompletionHandler, token_logprobs, trim_at_stop
from nanogpt_hf.tokenization import char_tokenizer, gpt2_hf_tokenizer

RUN = "out-tiny"  # the run folder's name: the model answers to it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(port, the run's folder, model, tokenizer): nanogpt-serve started once on a folder save_pretrained wrote. A
    second nanogpt-serve on the same port while the first loads its model stops in one line (the port is held from
    the moment it is checked)."""
    root = tmp_path_factory.mktemp("openai")
    folder = root / RUN
    model = decisive(tiny_model(vocab_size=50304, block_size=64), seed=3)  # a greedy text of several tokens
    save_model_folder(model, gpt2_hf_tokenizer(64), str(folder))
    port = serve.free_port()
    env = {**os.environ, "NANOGPT_HF_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "nanogpt_hf.serve", str(folder), "--port", str(port)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout.readline().startswith("serving ")  # printed once the port is bound, before the model loads
    second = run_cli([sys.executable, "-m", "nanogpt_hf.serve", str(folder), "--port", str(port)], env=env)
    assert_one_line_error(second, f"--port {port}: cannot listen on 127.0.0.1:{port}")  # c38e359: both loaded
    try:
        serve.wait_until_serving(port, process, timeout=180)
    except RuntimeError:
        process.kill()
        raise AssertionError(process.stdout.read()[-3000:]) from None
    model, tok = load_model_and_tokenizer(str(folder))
    yield port, folder, model.eval(), tok
    process.terminate()
    process.wait(timeout=30)


def post(port, body, path="/v1/completions"):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        raw = response.read().decode()
    return json.loads(raw) if not body.get("stream") else [
        json.loads(line[len("data: "):]) for line in raw.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def refused(port, body, path="/v1/completions"):
    """The 4xx status and its detail."""
    with pytest.raises(urllib.error.HTTPError) as error:
        post(port, body, path)
    return error.value.code, json.loads(error.value.read().decode())["detail"]


def greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def log_softmax(model, ids):
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.slow
def test_echo_and_logprobs_are_the_models_log_softmax_through_the_openai_client(server):
    """`openai` 3.x's own client, the model named by the run's folder name: echo with logprobs returns the prompt's
    tokens and, from the second on, their log-probabilities and the top ones, equal to the model's log_softmax."""
    from openai import OpenAI

    port, _, model, tok = server
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    prompt = "ROMEO: But soft, what light"
    ids = tok(prompt).input_ids
    answer = client.completions.create(model=RUN, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    (choice,) = answer.choices
    generated = greedy(model, ids, 3)
    sequence = ids + generated
    assert choice.text == prompt + tok.decode(generated)
    expected = log_softmax(model, sequence)
    logprobs = choice.logprobs
    assert logprobs.tokens == [tok.decode([i]) for i in sequence]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    want = [expected[i - 1, sequence[i]].item() for i in range(1, len(sequence))]
    assert logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for i, top in enumerate(logprobs.top_logprobs[1:], start=1):
        best = expected[i - 1].topk(2)
        assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)
    assert logprobs.text_offset[:2] == [0, len(logprobs.tokens[0])]
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 3
    # without echo: the completion's tokens alone; with max_tokens=0 and echo: the prompt scored, nothing generated
    alone = client.completions.create(model=RUN, prompt=prompt, max_tokens=3, temperature=0, logprobs=0)
    assert alone.choices[0].logprobs.token_logprobs == pytest.approx(want[-3:], abs=1e-4)
    scored = client.completions.create(model=RUN, prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    assert scored.choices[0].text == prompt and scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        want[:len(ids) - 1], abs=1e-4)


@pytest.mark.slow
def test_a_list_of_prompts_n_choices_and_stop_as_openai_returns_them(server):
    """A list of prompts (text and token ids) with n=2: choices indexed prompt by prompt, each greedy generate's text;
    `stop` cuts the text before the stop string, streamed or not (transformers' server kept it)."""
    port, _, model, tok = server
    ids = tok("KING").input_ids
    answer = post(port, {"model": RUN, "prompt": ["ROMEO:", ids], "max_tokens": 4, "temperature": 0, "n": 2})
    texts = [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
    first, second = (tok.decode(greedy(model, tok(p).input_ids if isinstance(p, str) else p, 4)) for p in ("ROMEO:", ids))
    assert texts == [first, first, second, second]
    assert answer["usage"]["completion_tokens"] == 16
    generated = greedy(model, tok("ROMEO:").input_ids, 8)
    text = tok.decode(generated)
    stop = tok.decode(generated[3:5])
    assert stop and stop in text
    cut = post(port, {"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0, "stop": [stop, "never there"]})
    assert cut["choices"][0]["text"] == text[:text.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    chunks = post(port, {"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0, "stop": stop, "stream": True})
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    assert streamed == text[:text.index(stop)] and chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.slow
def test_what_the_endpoint_cannot_take_is_a_400_naming_the_field(server):
    port = server[0]
    cases = [({"max_tokens": 2}, "prompt: missing"), ({"prompt": ""}, "prompt: empty"),
             ({"prompt": "\ud800"}, "prompt: not valid Unicode"), ({"prompt": [[]]}, "prompt: a list of token ids"),
             ({"prompt": [50304]}, "prompt: token ids [50304] are outside the vocabulary"),
             ({"prompt": "a", "n": 0}, "n: an integer from 1 to 16"), ({"prompt": "a", "logprobs": 6}, "logprobs:"),
             ({"prompt": "a", "best_of": 2}, "best_of: not supported"),
             ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty: not supported"),
             ({"prompt": "a", "n": 2, "stream": True}, "n: not supported with stream=true"),
             ({"prompt": ["a", "b"], "n": 9}, "n: 2 prompts x n=9 is more than 16"), ({"prompt": 3}, "prompt: a string")]
    for body, message in cases:
        code, detail = refused(port, {"model": RUN, **body})
        assert code == 400 and detail.startswith(message), (body, detail)
    code, detail = refused(port, {"model": RUN, "messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
    assert code == 400 and "no chat template: send a prompt to /v1/completions" in detail


def test_a_char_models_prompt_outside_its_vocabulary_is_refused_and_logprobs_come_from_the_model():
    """Without a server: the prompt check a char model's request meets (c38e359 encoded the character as <pad>),
    and the function the model's process runs for logprobs against the model's own log_softmax."""
    tok = char_tokenizer(list("abc \n"))
    assert NanoGPTCompletionHandler._ids("ab c", tok, len(tok)) == tok("ab c").input_ids
    with pytest.raises(HTTPException) as error:
        NanoGPTCompletionHandler._ids("abé", tok, len(tok))
    assert error.value.status_code == 400 and "'é' is not in this model's vocabulary" in error.value.detail
    model = tiny_model(vocab_size=len(tok), block_size=16).eval()
    ids = [0, 1, 2, 3, 1]
    chosen, best = token_logprobs(model, tok, ids, 2)
    expected = log_softmax(model, ids)
    assert chosen == pytest.approx([expected[i - 1, ids[i]].item() for i in range(1, 5)], abs=1e-6)
    torch.testing.assert_close(torch.tensor([values for _, values in best]), expected[:-1].topk(2).values)
    assert [ids for ids, _ in best] == expected[:-1].topk(2).indices.tolist()
    assert trim_at_stop("abc\n\nd", ["\n\n", "c"]) == ("ab", True) and trim_at_stop("ab", ["x"]) == ("ab", False)


@pytest.mark.slow
def test_lm_eval_local_completions_against_the_endpoint_scores_as_its_hf_backend(server, tmp_path):
    """lm-evaluation-harness's HellaSwag task on the same local rows, once through `local-completions` against
    nanogpt-serve (prompt log-probabilities from echo + logprobs) and once in-process with its `hf` backend: the
    same per-ending log-likelihoods, acc and acc_norm."""
    import lm_eval.tasks

    port, folder, _, _ = server
    data = tmp_path / "hellaswag_val.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in HELLASWAG_ROWS) + "\n")
    shipped = os.path.join(os.path.dirname(lm_eval.tasks.__file__), "hellaswag", "hellaswag.yaml")
    (tmp_path / "hellaswag_local.yaml").write_text(
        f"include: {shipped}\ntask: hellaswag_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {data}\ntraining_split: null\n")
    backends = {
        "api": ["--model", "local-completions", "--model_args",
                f"base_url=http://127.0.0.1:{port}/v1/completions,model={RUN},tokenizer={folder},"
                f"tokenizer_backend=huggingface,trust_remote_code=True,max_length=63,num_concurrent=1"],
        "hf": ["--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True", "--device", "cpu"]}
    scores, results = {}, {}
    for name, args in backends.items():
        out = tmp_path / name
        proc = run_cli(["lm_eval", *args, "--tasks", "hellaswag_local", "--include_path", str(tmp_path),
                        "--batch_size", "1", "--output_path", str(out), "--log_samples"],
                       env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "model of type" not in proc.stderr  # the folder's tokenizer read with its config, no fallback
        samples = [json.loads(line) for f in glob.glob(str(out / "*" / "samples_hellaswag_local_*.jsonl")) for line in open(f)]
        scores[name] = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}
        results[name] = json.load(open(glob.glob(str(out / "*" / "results_*.json"))[0]))["results"]["hellaswag_local"]
    assert scores["api"].keys() == scores["hf"].keys() and len(scores["api"]) == len(HELLASWAG_ROWS)
    for doc, values in scores["hf"].items():
        assert scores["api"][doc] == pytest.approx(values, abs=1e-3)
    for metric in ("acc,none", "acc_norm,none"):
        assert results["api"][metric] == results["hf"][metric]
