"""Saved folders, fresh-process loading, pipelines and tokenizers: the Hugging Face side of the model."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from conftest import run_python, tiny_model
from nanogpt_hf import NanoGPTForCausalLM
from nanogpt_hf.model_io import save_model_folder
from nanogpt_hf.tokenization import char_tokenizer, gpt2_encoding, gpt2_hf_tokenizer

SHAKESPEARE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanogpt_hf", "assets",
                           "tinyshakespeare", "input.txt")


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    """A BPE model folder and a char model folder, as the trainer writes them, plus reference outputs."""
    root = tmp_path_factory.mktemp("models")
    bpe_tok = gpt2_hf_tokenizer(model_max_length=64)
    bpe = tiny_model(vocab_size=50304, block_size=64, seed=1)
    save_model_folder(bpe, bpe_tok, str(root / "bpe"))
    text = open(SHAKESPEARE, encoding="utf-8").read()[:20000]
    char_tok = char_tokenizer(sorted(set(text)), model_max_length=64)
    char = tiny_model(vocab_size=len(char_tok), block_size=64, seed=2)
    save_model_folder(char, char_tok, str(root / "char"))
    x = torch.tensor([bpe_tok.encode("Hello, my dear friend")])
    torch.save({"x": x, "logits": bpe(x).logits.detach()}, root / "ref.pt")
    return root


def test_saved_folder_is_self_contained(saved_folders):
    files = set(os.listdir(saved_folders / "bpe"))
    assert {"config.json", "model.safetensors", "generation_config.json", "modeling_nanogpt.py",
            "configuration_nanogpt.py", "gpt2_conversion.py", "cpu_decoding.py", "tokenizer.json"} <= files
    config = json.load(open(saved_folders / "bpe" / "config.json"))
    assert config["auto_map"] == {"AutoConfig": "configuration_nanogpt.NanoGPTConfig",
                                  "AutoModel": "modeling_nanogpt.NanoGPTModel",
                                  "AutoModelForCausalLM": "modeling_nanogpt.NanoGPTForCausalLM"}
    assert config["tie_word_embeddings"] is True
    char_files = set(os.listdir(saved_folders / "char"))
    assert {"tokenizer.json", "tokenizer_config.json"} <= char_files and "tokenization_nanogpt_char.py" not in char_files
    loaded = AutoModelForCausalLM.from_pretrained(saved_folders / "bpe")
    assert isinstance(loaded, NanoGPTForCausalLM) and loaded.lm_head.weight is loaded.transformer.wte.weight


@pytest.mark.slow
def test_fresh_process_without_the_package_loads_and_runs_pipelines(saved_folders):
    proc = run_python(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        root = {str(saved_folders)!r}
        ref = torch.load(root + "/ref.pt", weights_only=True)
        model = AutoModelForCausalLM.from_pretrained(root + "/bpe", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert torch.allclose(model(ref["x"]).logits, ref["logits"], atol=1e-6)
        for kind, prompts in (("bpe", ["Hello there", "A much longer prompt than the first"]), ("char", ["ROMEO:", "To be, or"])):
            pipe = pipeline("text-generation", model=root + "/" + kind, trust_remote_code=True)
            outs = pipe(prompts, max_new_tokens=8, do_sample=False, batch_size=2)
            for prompt, out in zip(prompts, outs):
                text = out[0]["generated_text"]
                assert text.startswith(prompt), (kind, text)
                single = pipe(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
                assert single == text, (kind, single, text)  # left padding changes nothing
        tok = AutoTokenizer.from_pretrained(root + "/char", trust_remote_code=True)
        assert tok.decode(tok.encode("ROMEO: hi")) == "ROMEO: hi"
        from transformers import AutoModel
        base = AutoModel.from_pretrained(root + "/bpe", trust_remote_code=True).eval()
        assert type(base).__name__ == "NanoGPTModel" and base(ref["x"]).last_hidden_state.shape[-1] == 32
        feats = pipeline("feature-extraction", model=root + "/bpe", trust_remote_code=True)("Hello")
        assert len(feats[0][0]) == 32
        print("FRESH-OK")
        """,
        hide_package=True,
    )
    assert "FRESH-OK" in proc.stdout


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_pipeline_in_process_batched(saved_folders, kind):
    pipe = pipeline("text-generation", model=str(saved_folders / kind))
    prompts = ["First Citizen:", "We are accounted poor citizens"]
    outs = pipe(prompts, max_new_tokens=10, do_sample=False, batch_size=2)
    for prompt, out in zip(prompts, outs):
        assert out[0]["generated_text"].startswith(prompt)
        assert out[0]["generated_text"] == pipe(prompt, max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert pipe.tokenizer.padding_side == "left" and pipe.tokenizer.pad_token_id is not None


def test_tiktoken_and_hf_tokenizer_agree_on_all_of_tiny_shakespeare():
    text = open(SHAKESPEARE, encoding="utf-8").read()
    enc = gpt2_encoding()
    hf = gpt2_hf_tokenizer(model_max_length=10**9)
    ids = enc.encode_ordinary(text)
    assert len(ids) == 338025  # nanoGPT's shakespeare: 301,966 + 36,059 tokens
    assert hf(text)["input_ids"] == ids
    assert enc.decode(ids) == text
    assert enc.n_vocab == 50257 and enc.eot_token == 50256 == hf.eos_token_id


def test_corrupt_shipped_bpe_file_is_refused(tmp_path, monkeypatch):
    import shutil

    from nanogpt_hf import tokenization
    from nanogpt_hf.errors import UserError

    shutil.copytree(tokenization.ASSETS, tmp_path / "assets")
    with open(tmp_path / "assets" / "gpt2" / "vocab.bpe", "a") as f:
        f.write("x y\n")
    monkeypatch.setattr(tokenization, "ASSETS", str(tmp_path / "assets"))
    tokenization.gpt2_files.cache_clear()
    try:
        with pytest.raises(UserError, match="vocab.bpe is corrupt"):
            tokenization.gpt2_files()
    finally:
        tokenization.gpt2_files.cache_clear()
