"""A nanogpt-hf checkpoint behaves like any transformers causal LM: each test names the item of the conformance
issue it covers, and compares with transformers' own GPT-2 (`to_gpt2()`, the same function) wherever it can."""

import os

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

from conftest import ROOT, run_python, tiny_model
from nanogpt_hf import NanoGPTForCausalLM, NanoGPTModel
from nanogpt_hf.model_io import save_model_folder
from nanogpt_hf.tokenization import char_tokenizer, gpt2_hf_tokenizer

SHAKESPEARE = os.path.join(ROOT, "nanogpt_hf", "assets", "tinyshakespeare", "input.txt")
V01_CHAR = os.path.join(ROOT, "tests", "fixtures", "v0.1_char_model")  # saved by nanogpt-hf 0.1 (commit ead3a64)


def _chars():
    return sorted(set(open(SHAKESPEARE, encoding="utf-8").read()))


@pytest.fixture(scope="module")
def char_folder(tmp_path_factory):
    """A char model folder with a 16-token context, as the trainer writes it."""
    folder = tmp_path_factory.mktemp("char") / "model"
    tok = char_tokenizer(_chars(), model_max_length=16)
    save_model_folder(tiny_model(vocab_size=len(tok), block_size=16, seed=4), tok, str(folder))
    return folder


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe") / "model"
    save_model_folder(tiny_model(vocab_size=50304, block_size=64, seed=5), gpt2_hf_tokenizer(64), str(folder))
    return folder


def _greedy_cropped(model, idx, n):
    """nanoGPT's generate loop (crop to block_size, recompute) with argmax instead of sampling."""
    bs = model.config.block_size
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -bs:], use_cache=False).logits[:, -1, :]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


# ------------------------------------------------------------------------------ 1. generation past block_size
@pytest.mark.parametrize("cache", ["dynamic", "static", "none"])
def test_1_hf_generate_runs_past_block_size_like_nanogpts_cropped_loop(cache):
    model = tiny_model(block_size=16)
    x = torch.randint(0, 96, (2, 10))
    kwargs = {"none": dict(use_cache=False), "static": dict(cache_implementation="static"), "dynamic": {}}[cache]
    out = model.generate(x, max_new_tokens=30, do_sample=False, **kwargs)
    assert out.shape == (2, 40) and torch.equal(out, _greedy_cropped(model, x, 30))


@pytest.mark.slow
def test_1_running_past_block_size_is_not_warned_about():
    proc = run_python("""
        import torch, nanogpt_hf
        from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
        model = NanoGPTForCausalLM(NanoGPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=1, n_embd=8)).eval()
        print(model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=20, do_sample=False).shape[1])
        """)
    assert proc.stdout.split()[-1] == "23" and "exceeded the model's predefined maximum length" not in proc.stderr


def test_1_readme_pipeline_on_a_model_with_a_short_context(char_folder):
    pipe = pipeline("text-generation", model=str(char_folder))
    text = pipe("ROMEO:", max_new_tokens=40, do_sample=False)[0]["generated_text"]
    tok, model = pipe.tokenizer, pipe.model
    ref = _greedy_cropped(model, torch.tensor([tok.encode("ROMEO:")], device=model.device), 40)
    assert text == tok.decode(ref[0]) and len(ref[0]) == 46 > 16
    assert pipe("ROMEO:", max_new_tokens=30, do_sample=True, top_k=50)[0]["generated_text"].startswith("ROMEO:")


# ------------------------------------------------------------------------------------- 2. Trainer sees labels
@pytest.mark.slow
def test_2_trainer_evaluate_reports_eval_loss_and_keeps_the_best_model(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from transformers.utils import find_labels

    assert find_labels(NanoGPTForCausalLM) == ["labels"]
    model = tiny_model().train()
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (8, 16))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=4, per_device_train_batch_size=4, max_steps=2,
                             eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                             load_best_model_at_end=True, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds)
    model.eval()
    with torch.no_grad():
        expected = model(ids, labels=ids).loss.item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)
    trainer.train()  # load_best_model_at_end reads eval_loss: a KeyError before
    assert trainer.state.best_metric is not None


def test_2_loss_uses_transformers_loss_function_with_num_items_in_batch(tiny):
    x = torch.randint(0, 96, (2, 10))
    labels = x.clone()
    labels[0, :4] = -100
    logits = tiny(x).logits
    total = F.cross_entropy(logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1), ignore_index=-100,
                            reduction="sum")
    assert torch.allclose(tiny(x, labels=labels, num_items_in_batch=torch.tensor(40)).loss, total / 40, atol=1e-6)
    # nanoGPT's pre-shifted targets still reach the loss, as a keyword Trainer does not mistake for labels
    assert torch.allclose(tiny(x[:, :-1], shift_labels=x[:, 1:]).loss,
                          F.cross_entropy(tiny(x[:, :-1]).logits.reshape(-1, 96), x[:, 1:].reshape(-1)), atol=1e-6)


def test_2_shift_labels_win_over_labels_as_sequence_parallel_trainers_need(tiny):
    """With both given (sequence/context-parallel trainers shift before sharding), the loss follows shift_labels."""
    x = torch.randint(0, 96, (2, 10))
    shifted = torch.randint(0, 96, (2, 10))
    base = tiny(x, labels=x, shift_labels=shifted).loss
    assert torch.equal(base, tiny(x, labels=torch.randint(0, 96, (2, 10)), shift_labels=shifted).loss)
    assert not torch.equal(base, tiny(x, labels=x, shift_labels=torch.randint(0, 96, (2, 10))).loss)


def test_4_attention_can_be_switched_on_a_live_model(tiny):
    x = torch.randint(0, 96, (1, 9))
    sdpa = tiny(x).logits
    tiny.set_attn_implementation("eager")
    assert tiny.config._attn_implementation == "eager" and tiny(x, output_attentions=True).attentions is not None
    assert torch.allclose(tiny(x).logits, sdpa, atol=1e-5)


# -------------------------------------------------------------------------- 3. padding side saved; batching
def test_3_saved_bpe_tokenizer_pads_left_and_batched_generation_equals_one_by_one(bpe_folder):
    tok = AutoTokenizer.from_pretrained(bpe_folder)
    assert tok.padding_side == "left" and tok.pad_token == "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(bpe_folder).eval()
    prompts = ["Hello", "A much longer prompt than the first one"]
    batch = model.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=6, do_sample=False)
    for row, prompt in zip(batch, prompts):
        alone = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=6, do_sample=False)[0]
        assert tok.decode(row, skip_special_tokens=True) == tok.decode(alone, skip_special_tokens=True)


# -------------------------------------------------------------- 4. hidden states, attentions, eager, tuples
def test_4_hidden_states_and_attentions_equal_gpt2s(tiny):
    gpt2 = tiny.to_gpt2().eval()
    gpt2.config._attn_implementation = "eager"
    x = torch.randint(0, 96, (2, 12))
    ours = tiny(x, output_hidden_states=True, output_attentions=True)
    ref = gpt2(x, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == len(ref.hidden_states) == 3 and len(ours.attentions) == 2
    for a, b in zip(ours.hidden_states + ours.attentions, ref.hidden_states + ref.attentions):
        assert torch.allclose(a, b, atol=1e-5)
    tiny.config.output_hidden_states = True  # the config's default is honoured too
    assert len(tiny(x).hidden_states) == 3


def test_4_attn_implementation_eager_is_used_and_equals_sdpa(bpe_folder, monkeypatch):
    sdpa = tiny_model()
    eager = AutoModelForCausalLM.from_pretrained(bpe_folder, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    eager(torch.randint(0, 50257, (1, 8)))
    assert calls == []  # the eager path ran
    sdpa_ids = torch.randint(0, 96, (2, 9))
    sdpa_logits = sdpa(sdpa_ids).logits
    assert len(calls) == 2
    sdpa.config._attn_implementation = "eager"
    assert torch.allclose(sdpa(sdpa_ids).logits, sdpa_logits, atol=1e-5)


def test_4_return_dict_false_gives_gpt2s_tuple(tiny):
    x = torch.randint(0, 96, (2, 8))
    gpt2 = tiny.to_gpt2().eval()
    ours, ref = tiny(x, labels=x, return_dict=False), gpt2(x, labels=x, return_dict=False)
    assert len(ours) == len(ref) == 3  # loss, logits, cache
    assert torch.allclose(ours[0], ref[0], atol=1e-5) and torch.allclose(ours[1], ref[1], atol=1e-5)
    loss, logits = tiny.train()(x, labels=x, return_dict=False)  # no cache by default in training
    assert torch.allclose(loss, ref[0], atol=1e-5)


# ------------------------------------------------------------------------------------------ 5. base model
def test_5_automodel_and_feature_extraction_give_gpt2models_hidden_states(bpe_folder):
    base = AutoModel.from_pretrained(bpe_folder).eval()
    assert isinstance(base, NanoGPTModel)
    lm = AutoModelForCausalLM.from_pretrained(bpe_folder).eval()
    ref = lm.to_gpt2().transformer  # transformers' GPT2Model with the same weights
    x = torch.randint(0, 50257, (2, 7))
    assert torch.allclose(base(x).last_hidden_state, ref.eval()(x).last_hidden_state, atol=1e-5)
    features = pipeline("feature-extraction", model=str(bpe_folder))("Hello world", return_tensors=True)
    tok = AutoTokenizer.from_pretrained(bpe_folder)
    assert torch.allclose(features[0], base(torch.tensor([tok.encode("Hello world")])).last_hidden_state[0], atol=1e-5)


# ----------------------------------------------------------- 6. inputs_embeds, peft, gradient checkpointing
def test_6_inputs_embeds_equal_input_ids(tiny):
    x = torch.randint(0, 96, (2, 9))
    embeds = tiny.get_input_embeddings()(x)
    assert torch.allclose(tiny(inputs_embeds=embeds).logits, tiny(x).logits, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        tiny(x, inputs_embeds=embeds)


def _lively(seed=11, **overrides):
    """A tiny model whose greedy continuations vary (GPT-2's 0.02 init makes a random one repeat one token)."""
    model = tiny_model(seed=seed, block_size=64, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(25) if p.dim() == 2 else None
    return model


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_6_generate_from_inputs_embeds_equals_gpt2(cache):
    """generate(inputs_embeds=...) as GPT2LMHeadModel does it (prompt tuning, soft prompts): the same new tokens
    from the embeddings alone, equal to generating from the ids, with a dynamic and a static cache."""
    ours = _lively()
    gpt2 = ours.to_gpt2().eval()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, cache_implementation=cache)
    new = {}
    for name, model in (("ours", ours), ("gpt2", gpt2)):
        new[name] = model.generate(inputs_embeds=model.get_input_embeddings()(ids), **kw)
    assert new["ours"].shape == (2, 10) and torch.equal(new["ours"], new["gpt2"])
    assert torch.equal(new["ours"], ours.generate(ids, attention_mask=torch.ones_like(ids), **kw)[:, 7:])
    assert len(set(new["ours"][0].tolist())) > 2  # a real continuation, not one token repeated


def test_6_generate_continues_from_inputs_embeds_with_a_cache():
    """transformers' continue-from-embeddings pattern: generate, then feed the returned cache and more embeddings."""
    ours = _lively()
    gpt2 = ours.to_gpt2().eval()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    more = torch.randint(0, 96, (1, 3), generator=torch.Generator().manual_seed(5))
    results = {}
    for name, model in (("ours", ours), ("gpt2", gpt2)):
        embed = model.get_input_embeddings()
        first = model.generate(inputs_embeds=embed(ids), max_new_tokens=4, do_sample=False, pad_token_id=0,
                               return_dict_in_generate=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        prompt = torch.cat([ids, first.sequences, more], dim=1)
        second = model.generate(inputs_embeds=embed(prompt), past_key_values=cache, max_new_tokens=5, do_sample=False,
                                pad_token_id=0)
        results[name] = (first.sequences, second)
    assert torch.equal(results["ours"][0], results["gpt2"][0]) and torch.equal(results["ours"][1], results["gpt2"][1])
    prompt = torch.cat([ids, results["ours"][0], more], dim=1)
    reference = ours.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                              pad_token_id=0)
    assert torch.equal(results["ours"][1], reference[:, -5:])


def test_6_peft_prompt_tuning_and_lora_train(tiny):
    peft = pytest.importorskip("peft")  # a test extra: setup.sh installs it, so this runs in CI
    x = torch.randint(0, 96, (2, 8))
    prompt = peft.get_peft_model(tiny_model(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    out = prompt(input_ids=x, labels=x)
    out.loss.backward()
    assert out.logits.shape == (2, 12, 96) and prompt.prompt_encoder["default"].embedding.weight.grad is not None
    lora = peft.get_peft_model(tiny_model(), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"], r=4))
    lora(input_ids=x, labels=x).loss.backward()
    assert lora.generate(input_ids=x, max_new_tokens=3, do_sample=False).shape == (2, 11)


def test_6_gradient_checkpointing_gives_the_same_gradients(tiny):
    x = torch.randint(0, 96, (2, 16))

    def grads(model):
        model.zero_grad()
        model(x, labels=x).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    model = tiny_model(dropout=0.0).train()
    plain = grads(model)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and all(b.gradient_checkpointing for b in model.transformer.h)
    for a, b in zip(grads(model), plain):
        assert torch.allclose(a, b, atol=1e-7)


# ------------------------------------------------------------------------------------ 7. generate dispatch
def test_7_generate_takes_nanogpts_sampler_only_for_the_seed_form(tiny, monkeypatch):
    x = torch.randint(0, 96, (1, 4))
    calls = []
    real = NanoGPTForCausalLM._generate_nanogpt
    monkeypatch.setattr(NanoGPTForCausalLM, "_generate_nanogpt", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    nanogpt_forms = [((x, 5), {}), ((x, 5), dict(temperature=0.8)), ((x,), dict(max_new_tokens=5, top_k=3)),
                     ((), dict(idx=x, max_new_tokens=5, temperature=0.8, top_k=3)), ((x, 5, 0.9, 4), {})]
    for args, kwargs in nanogpt_forms:
        calls.clear()
        assert tiny.generate(*args, **kwargs).shape == (1, 9) and calls == [1], (args, kwargs)
    hf_forms = [((x,), dict(temperature=0.7, do_sample=True)), ((x,), dict(top_k=50, do_sample=True)),
                ((x, 5), dict(do_sample=True)), ((x, 5), dict(do_sample=False)),
                ((x,), dict(max_new_tokens=5, do_sample=False)), ((x,), dict(max_new_tokens=5, temperature=0.8, top_p=0.9))]
    for args, kwargs in hf_forms:
        calls.clear()
        out = tiny.generate(*args, **kwargs)
        assert calls == [] and out.shape[0] == 1, (args, kwargs)
    assert tiny.generate(x, 5, do_sample=False).shape == (1, 9)  # a positional int with HF keywords: max_new_tokens
    greedy = tiny.generate(x, 5, do_sample=False)
    assert torch.equal(greedy, tiny.generate(x, max_new_tokens=5, do_sample=False, use_cache=False))


# ------------------------------------------------------ 8. char tokenizer: stock, end of text, exports, lm-eval
def test_8_char_tokenizer_is_stock_with_end_of_text(tmp_path):
    text = open(SHAKESPEARE, encoding="utf-8").read()
    chars = _chars()
    tok = char_tokenizer(chars)
    assert len(tok) == 67 and tok.pad_token_id == 65 and tok.eos_token_id == 66  # nanoGPT's 65 chars first
    sample = text[:3000]
    assert tok.encode(sample) == [chars.index(c) for c in sample]  # nanoGPT's stoi
    assert tok.decode(tok.encode(sample)) == sample
    tok.save_pretrained(tmp_path)
    assert not (tmp_path / "tokenization_nanogpt_char.py").exists()
    again = AutoTokenizer.from_pretrained(tmp_path)  # no remote code: a stock tokenizer
    assert again.encode(sample) == tok.encode(sample) and again.padding_side == "left"
    batch = again(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [65, 65] and batch["attention_mask"][0] == [0, 0, 1, 1]
    assert again.decode(tok.encode("ab") + [66], skip_special_tokens=True) == "ab"


@pytest.mark.slow
def test_8_exported_char_folder_loads_without_remote_code_or_the_package(char_folder, tmp_path):
    from nanogpt_hf.export import export_gpt2

    dest = tmp_path / "export"
    export_gpt2(str(char_folder), str(dest))
    model = NanoGPTForCausalLM.from_pretrained(char_folder)
    assert model.config.pad_token_id == 65 and model.config.eos_token_id == 66
    proc = run_python(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        cfg = json.load(open({str(dest / "config.json")!r}))
        assert "auto_map" not in cfg and cfg["pad_token_id"] == 65 and cfg["eos_token_id"] == 66, cfg
        model = AutoModelForCausalLM.from_pretrained({str(dest)!r}, trust_remote_code=False)
        tok = AutoTokenizer.from_pretrained({str(dest)!r}, trust_remote_code=False)
        ids = tok("ROMEO:", return_tensors="pt").input_ids
        print(type(model).__name__, type(tok).__name__, tok.decode(model.generate(ids, max_new_tokens=5, do_sample=False)[0]))
        """,
        hide_package=True,
    )
    name, tok_name, text = proc.stdout.split(" ", 2)
    assert name == "GPT2LMHeadModel" and tok_name != "NanoGPTCharTokenizer" and text.startswith("ROMEO:")


def test_8_lm_eval_generate_until_runs_on_a_char_model(char_folder):
    lm_eval = pytest.importorskip("lm_eval")  # a test extra
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(char_folder), device="cpu", batch_size=2)
    requests = [Instance("generate_until", {}, ("ROMEO:", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}), 0),
                Instance("generate_until", {}, ("JULIET:", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}), 1)]
    outs = lm.generate_until(requests)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert lm.eot_token_id == 66 and lm_eval is not None


# ------------------------------------------------------------------------ 9. tokenizer of a BPE folder alone
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_9_autotokenizer_loads_a_model_folders_tokenizer_without_a_prompt(kind, bpe_folder, char_folder):
    """AutoTokenizer reads the folder's config first, whose class is the folder's code: transformers asks about it
    unless trust_remote_code=True is passed (docs/model.md) or nanogpt_hf is imported (it registers the type). Both,
    in fresh interpreters: no question, no "model of type nanogpt" warning, the stock tokenizer padding left."""
    folder = bpe_folder if kind == "bpe" else char_folder
    # stdin is /dev/null: a trust_remote_code prompt would print its question and fail at once on end of input
    for setup, kwargs in (("import sys", ", trust_remote_code=True"), ("import nanogpt_hf", "")):
        proc = run_python(f"""
            {setup}
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained({str(folder)!r}{kwargs})
            print(type(tok).__name__, tok.padding_side, "nanogpt_hf" in __import__("sys").modules)
            """)
        assert "custom code" not in proc.stdout + proc.stderr and "model of type" not in proc.stdout + proc.stderr
        assert proc.stdout.split()[1:] == ["left", str(setup == "import nanogpt_hf")]


# ------------------------------------------------------------------- 10. static cache masks, full-graph compile
def test_10_static_cache_with_padding_equals_dynamic_cache(tiny):
    a, b = torch.randint(0, 96, (1, 8)), torch.randint(0, 96, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    static = tiny.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                           cache_implementation="static", output_scores=True, return_dict_in_generate=True)
    dynamic = tiny.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                            output_scores=True, return_dict_in_generate=True)
    assert torch.equal(static.sequences, dynamic.sequences)
    for s, d in zip(static.scores, dynamic.scores):
        assert torch.allclose(s, d, atol=1e-5)  # the empty slots of the static cache are never attended


def test_10_decode_step_compiles_as_one_graph(tiny):
    from transformers import StaticCache

    x = torch.randint(0, 96, (1, 6))
    cache = StaticCache(config=tiny.config, max_cache_len=16)
    with torch.no_grad():
        tiny(x, cache=cache)
        step = torch.compile(tiny, fullgraph=True, backend="eager")  # raises on any graph break
        out = step(torch.randint(0, 96, (1, 1)), cache=cache, position_ids=torch.tensor([6]))
    assert out.logits.shape == (1, 1, 96)


# ------------------------------------------------------------------------------- 11. strict missing weights
def test_11_a_checkpoint_without_the_tied_embedding_reports_it_like_gpt2(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    results = {}
    for name, model, key in (("ours", tiny, "transformer.wte.weight"), ("gpt2", tiny.to_gpt2(), "transformer.wte.weight")):
        folder = tmp_path / name
        model.save_pretrained(folder)
        state = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in state.items() if k not in (key, "lm_head.weight")}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        _, info = type(model).from_pretrained(folder, output_loading_info=True)
        results[name] = sorted(k for k in info["missing_keys"] if "wte" in k or "lm_head" in k)
    assert results["ours"] == results["gpt2"] and "transformer.wte.weight" in results["ours"]


# ------------------------------------------------------------------------------------- old folders still load
@pytest.mark.slow
def test_folders_saved_by_version_0_1_still_load(tmp_path):
    ref = torch.load(os.path.join(V01_CHAR, "reference_logits.pt"), weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(V01_CHAR).eval()
    assert torch.allclose(model(ref["x"]).logits, ref["logits"], atol=1e-6)
    tok = AutoTokenizer.from_pretrained(V01_CHAR)
    assert tok.decode(tok.encode("ROMEO: to be")) == "ROMEO: to be"
    proc = run_python(f"""
        import torch
        from transformers import AutoModelForCausalLM
        ref = torch.load({os.path.join(V01_CHAR, "reference_logits.pt")!r}, weights_only=True)
        model = AutoModelForCausalLM.from_pretrained({V01_CHAR!r}, trust_remote_code=True).eval()
        assert torch.allclose(model(ref["x"]).logits, ref["logits"], atol=1e-6)
        print("OLD-OK")
        """, hide_package=True)
    assert "OLD-OK" in proc.stdout
