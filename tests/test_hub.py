"""Hub push and pull, and export. The Hub's servers cannot be reached here: the push path runs the real
huggingface_hub upload code (create_repo, preupload, commit; HF_HUB_DISABLE_XET=1) against a local HTTP stand-in
for those three endpoints; the pull path runs it offline against a populated cache in the Hub's layout."""

import base64
import glob
import http.server
import json
import os
import shutil
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TRAIN, assert_one_line_error, read_log, run_cli, train_args, train_losses
from nanogpt_hf import NanoGPTForCausalLM
from nanogpt_hf.export import main as export_main
from nanogpt_hf.train import main as train_main

pytestmark = pytest.mark.slow  # every test here starts processes (trainers, launchers, CLIs)


class HubStandIn(http.server.BaseHTTPRequestHandler):
    """The part of the Hub's HTTP API that huggingface_hub's create_repo and (non-xet) create_commit use:
    POST /api/repos/create, /api/models/{repo}/preupload/{rev}, /api/models/{repo}/commit/{rev}. Files land in
    `root`; every request is recorded with its Authorization header."""

    root, requests, commit_delay = None, [], 0.0

    def log_message(self, *args):
        pass

    def _reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).requests.append((self.path, self.headers.get("Authorization")))
        endpoint = f"http://{self.headers['Host']}"
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            os.makedirs(os.path.join(self.root, repo), exist_ok=True)
            with open(os.path.join(self.root, repo + ".visibility"), "w") as f:
                f.write(str(payload.get("visibility")))
            return self._reply(200, {"url": f"{endpoint}/{repo}"})
        if path == "/api/validate-yaml":  # the model card's metadata is checked before a commit with README.md
            card = json.loads(body)["content"]
            ok = card.startswith("---\n") and "\n---\n" in card[4:]
            return self._reply(200 if ok else 400, {"errors": [] if ok else [{"message": "no YAML header"}], "warnings": []})
        parts = path.split("/")  # ['', 'api', 'models', org, name, action, revision]
        if len(parts) == 7 and parts[1:3] == ["api", "models"]:
            repo, action = f"{parts[3]}/{parts[4]}", parts[5]
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in files]})
            if action == "commit":
                time.sleep(type(self).commit_delay)  # a slow upload
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        dest = os.path.join(self.root, repo, item["value"]["path"])
                        os.makedirs(os.path.dirname(dest), exist_ok=True)
                        with open(dest, "wb") as f:
                            f.write(base64.b64decode(item["value"]["content"]))
                oid = "%040x" % len(type(self).requests)
                return self._reply(200, {"commitUrl": f"{endpoint}/{repo}/commit/{oid}", "commitOid": oid})
        return self._reply(404, {"error": f"the stand-in does not implement {path}"})


@pytest.fixture
def hub_server(tmp_path):
    HubStandIn.root, HubStandIn.requests, HubStandIn.commit_delay = str(tmp_path / "hub"), [], 0.0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "hub"
    server.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("hubrun") / "out"
    train_main(train_args(out, char_data, "--max_iters=6", "--eval_interval=3", "--always_save_checkpoint=true"))
    return out


def test_training_run_pushes_through_the_real_upload_code(hub_server, tmp_path, char_data):
    endpoint, hub_root = hub_server
    out = tmp_path / "out"
    token = "hf_SECRETtoken123"
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    proc = run_cli(["python", TRAIN, *train_args(out, char_data, "--max_iters=6", "--eval_interval=3",
                                                   "--always_save_checkpoint=true", "--push_to_hub=true",
                                                   "--hub_model_id=me/baby-gpt", "--hub_push_training_state=true",
                                                   "--hub_strategy=every_save", "--optimizer=muon",
                                                   "--position_embedding=rope", "--qk_norm=true",
                                                   "--tie_word_embeddings=false")],
                   env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.split("?")[0] for p, _ in HubStandIn.requests} == {
        "/api/repos/create", "/api/validate-yaml", "/api/models/me/baby-gpt/preupload/main",
        "/api/models/me/baby-gpt/commit/main"}
    assert all(auth == f"Bearer {token}" for _, auth in HubStandIn.requests)  # the token from the environment
    commits = [p for p, _ in HubStandIn.requests if p.startswith("/api/models/me/baby-gpt/commit/")]
    assert len(commits) == 4  # every_save: after the saves at 3 and 6 (the last); model + training state each
    assert (hub_root / "me" / "baby-gpt.visibility").read_text() == "private"
    repo = hub_root / "me" / "baby-gpt"
    files = set(os.listdir(repo))
    assert {"config.json", "model.safetensors", "modeling_nanogpt.py", "configuration_nanogpt.py", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "README.md", "train_config.yaml", "log.jsonl"} <= files
    assert sorted(os.listdir(repo / "checkpoints")) == ["ckpt-0000003", "ckpt-0000006"]  # training state, per save
    assert "MANIFEST.json" in os.listdir(repo / "checkpoints" / "ckpt-0000006")
    card = open(repo / "README.md").read()
    val = [r for r in read_log(out) if "val/loss" in r][-1]["val/loss"]
    assert f"{val:.4f}" in card and "tokens seen | 768" in card and "--config train_config.yaml" in card
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)  # the speedrun's options travel too
    assert model.config.n_layer == 2 and model.config.position_embedding == "rope" and model.transformer.wpe is None
    assert model.lm_head.weight is not model.transformer.wte.weight
    for path in glob.glob(str(out / "**"), recursive=True):  # the token is never written anywhere
        if os.path.isfile(path):
            assert token.encode() not in open(path, "rb").read(), path
    assert token not in proc.stdout + proc.stderr


def test_a_slow_push_keeps_no_rank_waiting_in_a_collective(hub_server, tmp_path, char_data):
    """Two processes, every_save pushes, and an upload (each commit) slower than the run's ddp_timeout (8 s against
    5): the push runs in a process of its own, so rank 1 never waits in an all-reduce for rank 0's upload; the run
    trains to its end, waits for its last push after its last collective, and the Hub holds the final iteration."""
    endpoint, hub_root = hub_server
    HubStandIn.commit_delay = 8.0
    out = tmp_path / "out"
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_x", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    launcher = ["accelerate", "launch", "--config_file", os.path.join(os.path.dirname(TRAIN), "accelerate_configs",
                                                                        "cpu_ddp.yaml")]
    proc = run_cli([*launcher, TRAIN, *train_args(out, char_data, "--max_iters=60", "--eval_interval=20",
                                                    "--gradient_accumulation_steps=2", "--ddp_timeout=5",
                                                    "--push_to_hub=true", "--hub_model_id=me/baby-gpt",
                                                    "--hub_strategy=every_save")], env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout and "waiting for the push to me/baby-gpt to finish" in proc.stdout
    assert [r["iter"] for r in read_log(out) if "train/loss" in r] == list(range(60))
    card = open(hub_root / "me" / "baby-gpt" / "README.md").read()
    assert "| iterations | 60 |" in card  # the last push, done before the run ended
    assert not [n for n in os.listdir(out) if n.startswith(".push-")]  # each push removed what it staged


def test_a_push_keeps_the_evaluation_nanogpt_eval_added_to_the_card(hub_server, run, tmp_path, char_data):
    """nanogpt-eval --model_card adds a section (naming the iteration it measured); pushing afterwards, twice,
    rewrites only the push's own part of README.md, locally and in the upload."""
    endpoint, hub_root = hub_server
    out = tmp_path / "out"
    shutil.copytree(run, out)
    proc = run_cli([sys.executable, "-m", "nanogpt_hf.evaluate", "--init_from", str(out), "--data_dir", char_data,
                    "--max_tokens", "200", "--model_card"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_x", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    for _ in range(2):
        pushed = run_cli([sys.executable, "-m", "nanogpt_hf.hub", "push", str(out), "me/evaluated"], env=env)
        assert pushed.returncode == 0, pushed.stderr[-2000:]
    for card in (open(out / "README.md").read(), open(hub_root / "me" / "evaluated" / "README.md").read()):
        assert card.startswith("---\nlibrary_name: transformers")
        assert card.count("### Evaluation: val.bin (block 32) (the model of iteration 6)") == 1, card
        assert card.count("| iterations | 6 |") == 1 and "| last evaluation | iteration 6 |" in card


def test_resume_from_a_hub_id_through_the_offline_cache(run, tmp_path, char_data):
    cache = tmp_path / "hub_cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--me--baby-gpt" / "snapshots" / commit
    shutil.copytree(run / "checkpoints", snapshot / "checkpoints")
    (cache / "models--me--baby-gpt" / "refs").mkdir()
    (cache / "models--me--baby-gpt" / "refs" / "main").write_text(commit)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    elsewhere = tmp_path / "elsewhere"
    proc = run_cli(["python", TRAIN, *train_args(elsewhere, char_data, "--init_from=resume", "--resume_from=me/baby-gpt",
                                                   "--max_iters=8", "--eval_interval=3")], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming training from" in proc.stdout and "ckpt-0000006" in proc.stdout
    local = tmp_path / "local"
    shutil.copytree(run, local)
    proc = run_cli(["python", TRAIN, *train_args(local, char_data, "--init_from=resume", "--max_iters=8", "--eval_interval=3")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = train_losses(elsewhere)
    assert ours and ours == {k: v for k, v in train_losses(local).items() if k >= 6}
    # init_from=<hub id>: finetune a pushed model, tokenizer included, from the (offline) Hub cache
    for name in os.listdir(run):
        if os.path.isfile(run / name):
            shutil.copy(run / name, snapshot / name)
    tuned = run_cli(["python", TRAIN, *train_args(tmp_path / "tuned", char_data, "--init_from=me/baby-gpt",
                                                   "--max_iters=2", "--eval_interval=2")], env=env)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "Initializing from me/baby-gpt" in tuned.stdout and (tmp_path / "tuned" / "model.safetensors").exists()
    missing = run_cli(["python", TRAIN, *train_args(tmp_path / "x", char_data, "--init_from=resume",
                                                     "--resume_from=me/not-there")], env=env)
    assert missing.returncode == 2 and "cannot get its training state" in missing.stderr.splitlines()[-1]



def test_a_cached_model_loads_at_once_where_the_hub_cannot_be_reached(run, tmp_path):
    """A compute node without a network and with the model in its Hugging Face cache (HF_HUB_OFFLINE not set):
    huggingface_hub alone retries every file's request (2 min 45 s before the first sample, measured); the load
    notes the unreachable Hub and reads the cache. A model not cached is one line at once, gpt2 included."""
    cache = tmp_path / "hub_cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--me--baby-gpt" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in os.listdir(run):
        if os.path.isfile(run / name):
            shutil.copy(run / name, snapshot / name)
    (cache / "models--me--baby-gpt" / "refs").mkdir()
    (cache / "models--me--baby-gpt" / "refs" / "main").write_text(commit)
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(cache)}  # nothing listens
    sample = [sys.executable, "-m", "nanogpt_hf.sample", "--num_samples", "1", "--max_new_tokens", "5", "--init_from"]
    proc = run_cli([*sample, "me/baby-gpt"], env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("note: the Hub (http://127.0.0.1:9) cannot be reached: me/baby-gpt from the local cache "
                             "only") == 1, proc.stderr
    reference = run_cli([*sample, str(run)], timeout=60)
    assert proc.stdout == reference.stdout  # the same model, the same seed: the same sample
    for name in ("me/not-there", "gpt2"):
        missing = run_cli([*sample, name], env=env, timeout=60)
        assert_one_line_error(missing, f"{name}: not in the local Hugging Face cache ({cache}), and the Hub cannot "
                                       f"be reached from here")

def test_export_writes_a_plain_gpt2_folder(run, tmp_path, capsys):
    dest = tmp_path / "gpt2"
    export_main([str(run), str(dest)])
    plain = AutoModelForCausalLM.from_pretrained(dest)  # no trust_remote_code: a vanilla GPT-2 folder
    assert type(plain).__name__ == "GPT2LMHeadModel"
    ours = NanoGPTForCausalLM.from_pretrained(run).eval()
    x = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x).logits, ours(x).logits, atol=1e-5)
    with pytest.raises(SystemExit):
        export_main([str(run), str(dest)])  # never overwrites
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_a_failed_push_leaves_the_run_intact_and_is_retried_at_the_next_save(tmp_path, char_data):
    out = tmp_path / "out"
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    proc = run_cli(["python", TRAIN, *train_args(out, char_data, "--max_iters=6", "--eval_interval=3",
                                                   "--push_to_hub=true", "--hub_model_id=me/baby-gpt",
                                                   "--hub_strategy=every_save")], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    failures = [ln for ln in proc.stdout.splitlines() if ln.startswith("warning: push to me/baby-gpt failed")]
    assert len(failures) == 2 and all("retried at the next save" in ln for ln in failures)  # after each save
    assert "Traceback" not in proc.stderr and (out / "model.safetensors").exists()
    assert sorted(os.listdir(out / "checkpoints")) == ["ckpt-0000003", "ckpt-0000006"]
