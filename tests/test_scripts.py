"""nanogpt-sample, nanogpt-eval, nanogpt-bench, nanogpt-plot: flags, determinism, references, errors."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import AutoTokenizer

from conftest import HELLASWAG_ROWS, ROOT, assert_cli_error, run_cli, tiny_model, train_args
from nanogpt_hf.bench import main as bench_main
from nanogpt_hf.cpu_decoding import TIE
from nanogpt_hf.evaluate import main as eval_main
from nanogpt_hf.model_io import save_model_folder
from nanogpt_hf.sample import build_parser, generate_samples
from nanogpt_hf.sample import main as sample_main
from nanogpt_hf.tokenization import gpt2_hf_tokenizer
from nanogpt_hf.train import main as train_main

pytestmark = pytest.mark.slow  # every test here starts processes (trainers, launchers, CLIs)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("run") / "out"
    train_main(train_args(out, char_data, "--max_iters=6", "--eval_interval=3"))
    return str(out)


@pytest.fixture(scope="module")
def eot_model(tmp_path_factory):
    """A tiny BPE model that always predicts <|endoftext|> (its final hidden state points at EOT's embedding)."""
    folder = tmp_path_factory.mktemp("eot")
    model = tiny_model(vocab_size=50304, block_size=64, bias=True)
    with torch.no_grad():
        direction = torch.randn(32)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[50256] = 50 * direction
    save_model_folder(model, gpt2_hf_tokenizer(64), str(folder))
    return str(folder)


def _args(*argv):
    return build_parser().parse_args(list(argv))


def test_sample_is_deterministic_streams_and_runs_past_block_size(char_run, capsys):
    args = ("--out_dir", char_run, "--start", "ROMEO:", "--num_samples", "2", "--max_new_tokens", "80", "--seed", "7")
    a = generate_samples(_args(*args))
    b = generate_samples(_args(*args))
    assert a == b and len(a) == 2 and a[0] != a[1]  # same seed, same output; two different samples
    # 80 new tokens > block_size 32 (a sampled special token, never in the training data, is not printed)
    assert all(s.startswith("ROMEO:") and 32 < len(s) <= 6 + 80 for s in a), a
    assert generate_samples(_args(*args[:-1], "8")) != a
    capsys.readouterr()
    sample_main(list(args))  # streamed to the terminal token by token: the same text
    streamed = capsys.readouterr().out
    assert streamed == "".join(s + "\n---------------\n" for s in a)
    top_p = generate_samples(_args(*args, "--top_p", "0.5", "--top_k", "0"))
    assert len(top_p) == 2 and top_p != a


def test_sample_prompt_from_file(char_run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET:\n")
    out = generate_samples(_args("--out_dir", char_run, "--start", f"FILE:{prompt}", "--num_samples", "1",
                                 "--max_new_tokens", "5"))
    assert out[0].startswith("JULIET:\n")


def test_sample_stops_at_eot_and_never_prints_it(eot_model, capsys):
    stopped = generate_samples(_args("--init_from", eot_model, "--start", "Hello", "--num_samples", "1",
                                     "--max_new_tokens", "20", "--stop_at_eot"))
    assert stopped == ["Hello"]
    capsys.readouterr()
    sample_main(["--init_from", eot_model, "--start", "Hello", "--num_samples", "1", "--max_new_tokens", "20"])
    assert "<|endoftext|>" not in capsys.readouterr().out  # 20 EOT tokens generated, none printed raw


def _reference_loss(model, tokens, block):
    """The same windows, scored by transformers' GPT2LMHeadModel (to_gpt2), one window at a time."""
    gpt2 = model.to_gpt2().eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, block):
            w = torch.tensor(np.asarray(tokens[s:s + block + 1], dtype=np.int64))[None]
            logits = gpt2(w[:, :-1]).logits
            nll += F.cross_entropy(logits[0], w[0, 1:], reduction="sum").item()
            count += w.size(1) - 1
    return nll / count, count


def test_eval_full_pass_matches_gpt2_reference_and_ddp(char_run, char_data, tmp_path):
    from nanogpt_hf import NanoGPTForCausalLM

    out = tmp_path / "res.json"
    result = eval_main(["--init_from", char_run, "--data_dir", char_data, "--max_tokens", "5000", "--batch_size", "7",
                        "--output", str(out), "--model_card"])
    model = NanoGPTForCausalLM.from_pretrained(char_run).eval()
    tokens = np.memmap(os.path.join(char_data, "val.bin"), dtype=np.uint16, mode="r")[:5000]
    ref_loss, ref_count = _reference_loss(model, tokens, 32)
    assert result["tokens"] == ref_count == 4999  # every token after the first predicted exactly once
    assert result["loss"] == pytest.approx(ref_loss, abs=1e-5)
    assert json.load(open(out))["perplexity"] == pytest.approx(np.exp(ref_loss), rel=1e-5)
    assert "### Evaluation: val.bin (block 32)" in open(os.path.join(char_run, "README.md")).read()
    # split across two processes under accelerate launch: the same numbers
    proc = run_cli(["accelerate", "launch", "--config_file", os.path.join(ROOT, "accelerate_configs", "cpu_ddp.yaml"),
                    "-m", "nanogpt_hf.evaluate", "--init_from", char_run, "--data_dir", char_data, "--max_tokens", "5000",
                    "--batch_size", "7"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][0])
    assert ddp["tokens"] == 4999 and ddp["loss"] == pytest.approx(ref_loss, abs=1e-5)


def test_eval_on_a_local_dataset_file(char_run, tmp_path):
    from nanogpt_hf import NanoGPTForCausalLM

    docs = ["ROMEO: I love thee.", "JULIET: And I thee, my lord."]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    result = eval_main(["--init_from", char_run, "--hf_dataset", str(tmp_path / "docs.jsonl"), "--split", "train"])
    tok = AutoTokenizer.from_pretrained(char_run)
    ids = [i for d in docs for i in tok.encode(d)]  # no EOS in a character vocabulary: documents concatenated
    ref, count = _reference_loss(NanoGPTForCausalLM.from_pretrained(char_run).eval(), np.array(ids), 32)
    assert result["tokens"] == count == len(ids) - 1 and result["loss"] == pytest.approx(ref, abs=1e-5)


def test_multiple_choice_in_hellaswag_format(char_run, tmp_path, capfd):
    from nanogpt_hf import NanoGPTForCausalLM

    folder = tmp_path / "model"
    shutil.copytree(char_run, folder)
    trained = NanoGPTForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    trained.config.bias = True  # the same weights with (zero) biases, so ln_f can carry a constant direction
    model = NanoGPTForCausalLM(trained.config)
    with torch.no_grad():  # make 'e' overwhelmingly likely after anything: the answer is known
        model.load_state_dict(trained.state_dict(), strict=False)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
        direction = torch.randn(32)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[tok.convert_tokens_to_ids("e")] = 30 * direction
    model.save_pretrained(folder)
    data = tmp_path / "hs.jsonl"
    rows = [{"ctx": "The cat", "endings": ["sat on", "eeeeee", "ran to", "is big"], "label": 1},
            {"ctx": "Then", "endings": ["eee", "thou art", "we go", "no"], "label": 0},
            {"ctx": "And", "endings": ["my lord", "good", "ee", "oh!"], "label": 0},  # this one is answered wrong
            {"ctx": "The cat " * 6, "endings": ["eeeeee", "sat on", "ran to", "is big"], "label": 0},  # context cut
            {"ctx": "So", "endings": ["a" * 40, "eee", "no", "yes"], "label": 1}]  # an ending longer than 32 tokens
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = eval_main(["--init_from", str(folder), "--multiple_choice", str(data), "--mc_protocol", "llm.c"])
    assert result["protocol"] == "llm.c" and [p.get("pred") for p in result["predictions"]] == [1, 0, 2, 0, None]
    assert result["acc"] == pytest.approx(3 / 4) and result["acc_norm"] == pytest.approx(3 / 4)
    assert (result["examples"], result["skipped_too_long"], result["context_cut"]) == (4, 1, 1)
    captured = capfd.readouterr()
    assert "of 5 items, 1 left out" in captured.out and "1 scored with their context cut" in captured.out
    assert "Token indices sequence length" not in captured.err  # the scorer fits the block itself


def test_eval_errors(char_run, char_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["b"], "label": 3}\n')
    cases = [
        (["--init_from", char_run, "--multiple_choice", str(bad), "--mc_protocol", "llm.c"],
         "label 3 does not index the 1 endings"),
        (["--init_from", char_run, "--multiple_choice", str(bad)], "no activity_label, ctx_a, ctx_b (HellaSwag's fields"),
        (["--init_from", str(tmp_path / "none"), "--data_dir", char_data], "no such model folder"),
        (["--init_from", char_run, "--data_dir", str(tmp_path / "nodata")], "does not exist"),
        (["--init_from", char_run, "--data_dir", char_data, "--block_size", "999"], "--block_size must be in [1, 32]"),
    ]
    for argv, message in cases:
        assert_cli_error(eval_main, argv, message, capsys)


def test_bench_cli_reports_ratios_against_gpt2(tmp_path):
    out = tmp_path / "bench.json"
    trace = tmp_path / "trace.json"
    # the installed console script (it runs sys.exit(main()): the results must not become its exit status)
    script = os.path.join(os.path.dirname(sys.executable), "nanogpt-bench")
    proc = run_cli([script, "--what", "train,generate", "--shapes", "quickstart",
                    "--repeats", "1", "--warmup", "0", "--new_tokens", "4", "--json", str(out), "--profile", str(trace)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'what'" not in proc.stderr
    assert "loss_type" not in proc.stderr  # transformers' warning about GPT2LMHeadModel's loss: the bench names it
    assert "speed-up x" in proc.stdout and "x GPT2LMHeadModel's same path" in proc.stdout
    # every path against the bandwidth bound, and the served endpoint beside the in-process figures, set against
    # GPT2LMHeadModel through the same server
    assert "% of bound" in proc.stdout and "nanogpt-serve /v1/completions" in proc.stdout
    assert "GPT2LMHeadModel transformers serve" in proc.stdout
    results = {r["what"]: r for r in json.load(open(out))}
    train = results["train_step"]
    assert set(train["ms_per_step"]) >= {"nanogpt_hf", "GPT2LMHeadModel"} and all(v > 0 for v in train["ms_per_step"].values())
    assert 0 < train["mfu"]["nanogpt_hf"] and results["peak"]["flops"] > 0
    generate = results["generate"]
    assert generate["new_tokens"] == 4 and generate["read_bandwidth"] > 0  # measured before each run
    assert set(generate["of_bandwidth_bound"]) == set(generate["tokens_per_s"])
    assert generate["vs_GPT2LMHeadModel"]["nanogpt-serve /v1/completions"] > 0
    assert all(0 < share for share in generate["of_bandwidth_bound"].values())
    # the sampling paths again without torch.multinomial's draw, timed in the same run
    assert set(generate["of_bandwidth_bound_without_draw"]) == {
        "GPT2LMHeadModel generate, sampling top_k=1", "seed API generate(idx, n, top_k=1)", "nanogpt-sample loop",
        "seed API generate(idx, n, top_k=1), every product F.linear", "nanogpt-sample loop, every product F.linear",
        *(k for k in generate["tokens_per_s"] if "int8" in k and ("seed API" in k or "nanogpt-sample" in k))}
    assert all(generate["of_bandwidth_bound"][k] < share for k, share in generate["of_bandwidth_bound_without_draw"].items())
    assert generate["draw_seconds_per_token"] > 0 and "without the draw" in proc.stdout
    # both bounds (a 1 GiB buffer's read rate, a buffer the weights' size), our paths against plain F.linear decoding
    # (in process and through the endpoint), and the kernel each product shape chose with the times behind it
    assert generate["weights_read_bandwidth"] > 0 and set(generate["of_weights_bandwidth_bound"]) == set(generate["tokens_per_s"])
    assert set(generate["vs_plain_linear"]) == {"generate", "generate, static cache", "seed API generate(idx, n, top_k=1)",
                                                 "nanogpt-sample loop", "pipeline", "nanogpt-serve /v1/completions"}
    assert all(name + ", every product F.linear" in generate["tokens_per_s"] for name in generate["vs_plain_linear"])
    kernels = generate["kernels"]
    assert any(label.startswith("65 x 128, 1 row") for label in kernels), kernels  # the quickstart shape's head
    for kernel in kernels.values():  # the lowest median, or F.linear where none is TIE (5%) faster than it
        medians = kernel["median_us"]
        best = min(medians, key=medians.get)
        kept = "linear" in medians and medians[best] > TIE * medians["linear"]
        assert kernel["chosen"] == ("linear" if kept else best), kernel
    assert "kernel for " in proc.stdout and "x plain F.linear decoding" in proc.stdout
    assert any(e.get("name", "").startswith("aten::") for e in json.load(open(trace))["traceEvents"])


def test_bench_cli_errors(capsys):
    cases = [(["--what", "speed"], "--what: unknown speed"), (["--shapes", "huge"], "--shapes: unknown huge"),
             (["--device", "cpu:x"], "--device cpu:x")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA GPU is visible"))
    for argv, message in cases:
        assert_cli_error(bench_main, argv, message, capsys)


def test_bench_startup_and_quickstart_run_the_real_launcher(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli([sys.executable, "-m", "nanogpt_hf.bench", "--what", "startup,quickstart", "--quickstart_iters", "12",
                    "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["what"]: r for r in json.load(open(out))}
    quick = results["quickstart"]
    # the last iteration is evaluated: after 12 steps the loss is below the uniform ln(67) = 4.2, well above 2
    assert quick["iters"] == 12 and quick["val_loss_iter"] == 12 and 2.5 < quick["val_loss"] < 4.2
    assert 0 < quick["median_ms_per_iter"] < quick["seconds"] * 1000
    assert 0 < results["startup"]["seconds_to_first_step"] < 120
    assert "median" in proc.stdout and "first training step" in proc.stdout


def test_plot_writes_a_png(char_run):
    proc = run_cli([sys.executable, "-m", "nanogpt_hf.plot", char_run])
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(char_run, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_multiple_choice_scores_hellaswag_as_lm_evaluation_harness_does(tmp_path):
    """EleutherAI's harness running its own `hellaswag` task (its preprocessing, read from a local file in
    HellaSwag's schema) on our checkpoint: the same per-ending log-likelihoods, acc and acc_norm as nanogpt-eval's
    default protocol. llm.c's protocol, on the same rows, scores other text."""
    import glob

    import lm_eval.tasks

    folder = tmp_path / "bpe"
    save_model_folder(tiny_model(vocab_size=50304, block_size=64, seed=3), gpt2_hf_tokenizer(64), str(folder))
    data = tmp_path / "hellaswag_val.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in HELLASWAG_ROWS) + "\n")
    shipped = os.path.join(os.path.dirname(lm_eval.tasks.__file__), "hellaswag", "hellaswag.yaml")
    (tmp_path / "hellaswag_local.yaml").write_text(  # the harness's task, only its data read from the local file
        f"include: {shipped}\ntask: hellaswag_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {data}\ntraining_split: null\n")
    proc = run_cli(["lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True",
                    "--tasks", "hellaswag_local", "--include_path", str(tmp_path), "--device", "cpu", "--batch_size",
                    "1", "--output_path", str(tmp_path / "out"), "--log_samples"],
                   env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for f in glob.glob(str(tmp_path / "out" / "*" / "samples_hellaswag_local_*.jsonl"))
               for line in open(f)]
    ours = eval_main(["--init_from", str(folder), "--multiple_choice", str(data), "--output", str(tmp_path / "o.json")])
    assert ours["protocol"] == "lm-eval" and len(samples) == len(HELLASWAG_ROWS)
    for sample in samples:
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert theirs == pytest.approx(ours["predictions"][sample["doc_id"]]["scores"], abs=1e-4)
    results = json.load(open(glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))[0]))["results"]["hellaswag_local"]
    assert results["acc,none"] == pytest.approx(ours["acc"]) and results["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    raw = eval_main(["--init_from", str(folder), "--multiple_choice", str(data), "--mc_protocol", "llm.c"])
    assert raw["protocol"] == "llm.c"
    assert all(r["scores"] != o["scores"] for r, o in zip(raw["predictions"], ours["predictions"]))


def test_the_gpu_proof_refuses_a_machine_without_gpus_and_runs_its_steps_on_a_cpu(tmp_path, capsys):
    """`nanogpt-bench --what gpu` on this machine: one line. Its steps (the trainer with compile settings, the
    checkpoint through pipeline, fsdp.yaml on one process with a resume, speedrun_gpt2, generation) run here on the
    CPU with tiny shapes, so the code a GPU session runs unedited has run before."""
    from nanogpt_hf.bench import gpu_proof
    from nanogpt_hf.bench import main as bench_main

    if not torch.cuda.is_available():
        assert_cli_error(bench_main, ["--what", "gpu"], "needs a CUDA GPU; none is visible here", capsys)
    tiny = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--eval_iters=2",
            "--device=cpu", "--dtype=float32", "--compile=false", "--wandb_log=false", "--log_interval=1",
            "--gradient_accumulation_steps=1"]
    run = dict(train=["--config", "train_gpt2", *tiny, "--max_iters=8", "--eval_interval=8", "--warmup_iters=2"],
               fsdp=["--config", "finetune_shakespeare", "--init_from=scratch", "--bias=false", *tiny,
                     "--eval_interval=2", "--always_save_checkpoint=true"],
               speedrun=["--config", "speedrun_gpt2", *tiny, "--max_iters=6", "--eval_interval=6", "--warmup_iters=0"],
               shape="quickstart", fsdp_iters=(2, 4), new_tokens=8)
    result = gpu_proof("cpu", run, env={"NANOGPT_TEST_FSDP_ON_CPU": "1"})
    rows = dict(result["rows"])
    assert "ms/iter" in rows["train (compile, bf16)"] and "loaded and sampled: 'ROMEO:" in rows["checkpoint -> pipeline"]
    assert rows["fsdp.yaml, 1 process"].startswith("trained to 2, resumed to 4: ok")
    assert "ms/iter" in rows["speedrun_gpt2 steps"] and "vs GPT2LMHeadModel" in rows["cached generation, batch 1"]
