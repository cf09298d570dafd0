"""Prepared bins (nanoGPT's exact counts, split rules, atomic writes, errors) and the streaming source."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import ROOT, assert_cli_error, assert_one_line_error, run_cli
from nanogpt_hf.data import MemmapBatches, StreamingBatches
from nanogpt_hf.errors import UserError
from nanogpt_hf.prepare import main as prepare_main
from nanogpt_hf.prepare import prepare_documents, prepare_shakespeare, prepare_shakespeare_char
from nanogpt_hf.tokenization import gpt2_encoding

SHAKESPEARE = os.path.join(ROOT, "nanogpt_hf", "assets", "tinyshakespeare", "input.txt")


def test_shakespeare_char_matches_nanogpt_exactly(tmp_path):
    meta = prepare_shakespeare_char(str(tmp_path))
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1003854, 111540)
    text = open(SHAKESPEARE, encoding="utf-8").read()
    chars = sorted(set(text))
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    n = len(text)  # split rule: the first 90% of the characters train, the last 10% validate
    assert "".join(chars[i] for i in train[:500]) == text[:500]
    assert "".join(chars[i] for i in val) == text[int(n * 0.9):]
    saved = json.load(open(tmp_path / "meta.json"))
    assert saved["tokenizer"] == "char" and saved["itos"]["0"] == "\n" and saved["dtype"] == "uint16"
    tok = AutoTokenizer.from_pretrained(tmp_path)  # a stock tokenizer.json, no pickle, no remote code
    assert tok.convert_ids_to_tokens(list(range(65))) == chars and tok.eos_token_id == 66


def test_shakespeare_bpe_matches_nanogpt_exactly(tmp_path):
    meta = prepare_shakespeare(str(tmp_path))
    assert (meta["train_tokens"], meta["val_tokens"], meta["tokenizer"], meta["vocab_size"]) == (301966, 36059, "gpt2", 50257)
    text = open(SHAKESPEARE, encoding="utf-8").read()
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert gpt2_encoding().decode(val.tolist()) == text[int(len(text) * 0.9):]


def test_prepared_files_are_readable_like_any_new_file(tmp_path):
    """The atomic writes must not leave 0600 files (a shared data folder others cannot read)."""
    prepare_shakespeare_char(str(tmp_path))
    (tmp_path / "reference").write_text("")  # a file created the ordinary way, under the same umask
    expected = (tmp_path / "reference").stat().st_mode & 0o777
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


@pytest.mark.slow
def test_data_scripts_run_as_nanogpt_users_type_them(tmp_path):
    proc = run_cli([sys.executable, os.path.join(ROOT, "data", "shakespeare_char", "prepare.py"), "--out_dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert "train has 1,003,854 tokens, val has 111,540 tokens" in proc.stdout


def _write_docs(path, n_docs, seed=0):
    rng = np.random.default_rng(seed)
    words = open(SHAKESPEARE, encoding="utf-8").read().split()
    docs = [" ".join(rng.choice(words, size=rng.integers(5, 60))) for _ in range(n_docs)]
    if str(path).endswith(".jsonl"):
        with open(path, "w", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                f.write(json.dumps({"id": i, "body": d}) + "\n")
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs))
    return docs


@pytest.mark.parametrize("ext, column", [(".txt", "text"), (".jsonl", "body"), (".parquet", "body")])
def test_documents_recipe_on_local_files(tmp_path, ext, column):
    src = tmp_path / f"corpus{ext}"
    if ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        docs = _write_docs(tmp_path / "tmp.jsonl", 400)
        pq.write_table(pa.table({"body": docs}), src)
    else:
        docs = _write_docs(src, 400)
    meta = prepare_documents(str(tmp_path / "out"), files=[str(src)], text_column=column, test_size=0.05, total_batches=7)
    enc = gpt2_encoding()
    expected_total = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)  # + EOT per document
    assert meta["train_tokens"] + meta["val_tokens"] == expected_total
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert (val == 50256).sum() == 20  # 5% of 400 documents, nanoGPT's train_test_split rule
    # every document comes back whole, in one split or the other
    decoded = {d for part in (train, val) for d in enc.decode(part.tolist()).split("<|endoftext|>") if d}
    assert decoded == set(docs)
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]


@pytest.mark.slow
def test_killed_prepare_leaves_no_bin_that_looks_complete(tmp_path):
    """SIGKILL a real prepare run while it writes; whatever final files exist are complete, meta.json last."""
    import signal
    import subprocess
    import time

    big = tmp_path / "big.txt"
    big.write_text(open(SHAKESPEARE, encoding="utf-8").read() * 40)  # 45 MB: writing takes a while
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt_hf.prepare", "shakespeare_char", "--input", str(big),
                             "--out_dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and any(f.endswith(".tmp") for f in os.listdir(out))):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n = big.stat().st_size
    expected = {"train.bin": int(n * 0.9) * 2, "val.bin": (n - int(n * 0.9)) * 2}
    files = os.listdir(out)
    assert any(f.endswith(".tmp") for f in files)  # it was killed mid-write...
    assert "meta.json" not in files  # ...so the folder does not claim to be prepared
    for name, size in expected.items():  # ...and no final-named bin is partial
        assert name not in files or (out / name).stat().st_size == size
    with pytest.raises(UserError, match="meta.json is missing"):
        MemmapBatches(str(out), "train", 16, 4, 0)


def _bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (tmp_path / "tiny.txt").write_text("a")
    (tmp_path / "docs.jsonl").write_text('{"body": "hello"}\n{"body": "world"}\n')
    return [
        (["shakespeare_char", "--input", str(tmp_path / "missing.txt")], "does not exist"),
        (["shakespeare_char", "--input", str(tmp_path / "empty.txt")], "is empty"),
        (["shakespeare", "--input", str(tmp_path / "latin1.txt")], "is not UTF-8"),
        (["shakespeare_char", "--input", str(tmp_path / "tiny.txt")], "too short"),
        (["documents", "--files", str(tmp_path / "docs.jsonl")], "no column 'text' (columns: body)"),
        (["documents", "--files", str(tmp_path / "latin1.txt")], "is not UTF-8"),
        (["documents", "--files", str(tmp_path / "empty.txt")], "is empty"),
    ]


@pytest.mark.slow
def test_bad_inputs_give_one_line_and_leave_nothing(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    # the first through a real process (exit code, no traceback), the rest through the same entry point in-process
    args, message = cases[0]
    assert_one_line_error(run_cli([sys.executable, "-m", "nanogpt_hf.prepare", *args, "--out_dir", str(tmp_path / "o")]), message)
    for args, message in cases[1:]:
        out = tmp_path / "out"
        assert_cli_error(prepare_main, [*args, "--out_dir", str(out)], message, capsys)
        assert not out.exists() or not any(f.endswith(".bin") for f in os.listdir(out)), args


def test_char_vocabulary_too_large_for_uint16(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(70000 // 2)) * 2 + "".join(chr(0x10000 + i) for i in range(35000))
    with pytest.raises(UserError, match="do not fit uint16"):
        prepare_shakespeare_char(str(tmp_path), text=text, source="big.txt")


def test_memmap_batches_are_nanogpt_windows_and_resume_exactly(tmp_path):
    prepare_shakespeare(str(tmp_path))
    src = MemmapBatches(str(tmp_path), "train", block_size=16, batch_size=4, seed=7)
    data = np.fromfile(tmp_path / "train.bin", dtype=np.uint16).astype(np.int64)
    x, y = src.next_batch()
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    starts = [int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(data, 16) == row.numpy(), axis=1))[0]) for row in x]
    assert all(torch.equal(y[i], torch.from_numpy(data[s + 1:s + 17])) for i, s in enumerate(starts))
    state = src.state_dict()
    expected = [src.next_batch() for _ in range(3)]
    fresh = MemmapBatches(str(tmp_path), "train", block_size=16, batch_size=4, seed=999)
    fresh.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, [fresh.next_batch() for _ in range(3)]):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)


def test_memmap_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        MemmapBatches(str(tmp_path / "nope"), "train", 16, 4, 0)
    prepare_shakespeare(str(tmp_path))
    with pytest.raises(UserError, match="fewer than one block"):
        MemmapBatches(str(tmp_path), "val", 100000, 4, 0)
    open(tmp_path / "val.bin", "wb").close()
    with pytest.raises(UserError, match="is empty"):
        MemmapBatches(str(tmp_path), "val", 16, 4, 0)


@pytest.fixture(scope="module")
def doc_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    files, docs = [], []
    for i in range(3):  # 3 files = 3 shards: they do not divide world size 2
        path = root / f"part{i}.jsonl"
        docs += _write_docs(path, 60, seed=i)
        files.append(str(path))
    return files, docs


def _drain(src, n_batches):
    return torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in (src.next_batch() for _ in range(n_batches))])


def test_streaming_packs_all_tokens_in_order(doc_files):
    files, docs = doc_files
    enc = gpt2_encoding()
    stream = [t for d in docs for t in enc.encode_ordinary(d) + [50256]]
    src = StreamingBatches(block_size=31, batch_size=4, files=files, text_column="body")
    rows = _drain(src, len(stream) // (32 * 4))
    assert rows.shape[1] == 32
    assert rows.flatten().tolist() == stream[: rows.numel()]  # nothing dropped, nothing repeated, in order


@pytest.mark.parametrize("n_files", [2, 3])  # shards divide the world size, or not
def test_streaming_shards_across_two_ranks_without_overlap(doc_files, n_files):
    files, docs = doc_files
    files = files[:n_files]
    enc = gpt2_encoding()
    per_doc = {tuple(enc.encode_ordinary(d) + [50256]) for d in docs[: 60 * n_files]}
    total = sum(len(d) for d in per_doc)
    seen = []
    for rank in range(2):
        src = StreamingBatches(block_size=15, batch_size=1, files=files, text_column="body", rank=rank, world_size=2,
                               log=lambda m: None)
        n_rows = 0
        rank_tokens = []
        while src.epoch == 0:
            rank_tokens += src._next_row()
            n_rows += 1
        seen.append(rank_tokens)
    # together the two ranks cover the corpus: each rank drops at most one partial row (<16 tokens) at its end
    covered = sum(len(s) for s in seen)
    assert total - 2 * 16 < covered <= total + 2 * 16
    # no overlap: each document's token run appears in exactly one rank's stream
    streams = [" ".join(map(str, s)) for s in seen]
    for doc in list(per_doc)[:40]:
        needle = " ".join(map(str, doc[1:-1]))
        if len(doc) > 20:
            assert sum(needle in s for s in streams) == 1


def test_streaming_resume_gives_exactly_the_next_batches(doc_files):
    files, _ = doc_files
    src = StreamingBatches(block_size=23, batch_size=3, files=files, text_column="body", rank=1, world_size=2,
                           log=lambda m: None)
    for _ in range(5):
        src.next_batch()
    state = json.loads(json.dumps(src.state_dict()))  # the state survives JSON (how checkpoints store it)
    expected = _drain(src, 100)  # runs past the end of the stream into epoch 1
    assert src.epoch >= 1
    again = StreamingBatches(block_size=23, batch_size=3, files=files, text_column="body", rank=1, world_size=2,
                             log=lambda m: None)
    again.load_state_dict(state)
    assert torch.equal(_drain(again, 100), expected)


def test_shakespeare_is_downloaded_when_not_shipped(tmp_path, monkeypatch):
    """With the shipped copy gone, prepare fetches nanoGPT's URL (here a local HTTP server serving the file)."""
    import functools
    import http.server
    import threading

    from nanogpt_hf import prepare

    served = tmp_path / "served"
    served.mkdir()
    shutil_copy = __import__("shutil").copy
    shutil_copy(SHAKESPEARE, served / "input.txt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(prepare, "ASSETS", str(tmp_path / "no_assets"))
        monkeypatch.setattr(prepare, "SHAKESPEARE_URL", f"http://127.0.0.1:{server.server_address[1]}/input.txt")
        meta = prepare.prepare_shakespeare(str(tmp_path / "out"))
        assert (meta["train_tokens"], meta["val_tokens"]) == (301966, 36059)
        assert meta["source"].startswith("http://127.0.0.1")
        assert (tmp_path / "out" / "input.txt").read_bytes() == open(SHAKESPEARE, "rb").read()
        monkeypatch.setattr(prepare, "SHAKESPEARE_URL", f"http://127.0.0.1:{server.server_address[1]}/missing.txt")
        with pytest.raises(UserError, match="download failed"):
            prepare.prepare_shakespeare(str(tmp_path / "out2"))
    finally:
        server.shutdown()
