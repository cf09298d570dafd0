"""The run-folder fault campaign behind docs/robustness.md (too long for the suite: about 25 minutes on 2 cores).

    python tests/fault_campaign.py [--disk_full]      # --disk_full mounts a small tmpfs: needs root

Kills a tiny trainer (SIGKILL) at every phase of a training step, an evaluation, a checkpoint write, the model
refresh and the journal append, then resumes it with init_from=auto from a differently seeded process and checks
the result against one uninterrupted run: every complete checkpoint matches its manifest, the journal holds each
step and each evaluation exactly once, the per-step losses and final weights are bit-identical, the model folder
equals the newest checkpoint. Then SIGTERM/SIGINT at random moments; the plainest resume command (no flag but
init_from, out_dir and max_iters) after kills; a kill while a checkpoint of the same iteration is replaced; and bad
or untrusted inputs (a crafted manifest, code in a model folder, edited data, a diverging learning rate): each must
be one `error:` line and exit code 2, with the run folder and the data folder unchanged (hashed before and after).

    python tests/fault_campaign.py --only plain,replace,bad_inputs      # a subset
"""

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train_accelerate.py")
ARGS = ["--config", "train_shakespeare_char_cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=4", "--log_interval=1", "--warmup_iters=5", "--max_iters=24", "--eval_interval=6",
        "--always_save_checkpoint=true", "--dropout=0.1", "--keep_last=1"]
KILL_POINTS = ["step@1", "step@4", "step@9", "step@15", "step@22", "eval@2", "eval@4", "eval@7", "log@3", "log@12",
               "log@26", "checkpoint_begin@1", "checkpoint_begin@3", "checkpoint@1", "checkpoint@2",
               "checkpoint_manifest@1", "checkpoint_manifest@3", "publish@1", "publish@2", "publish_file@1",
               "publish_file@3", "step@24"]


def run(out, data, *extra, env=None, timeout=300, plain=False):
    """The campaign's trainer; plain=True: only the extra arguments (the plainest resume command)."""
    cmd = [sys.executable, TRAIN, *([] if plain else [*ARGS, f"--data_dir={data}"]), f"--out_dir={out}", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def journal(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def tree_digest(folder):
    return {os.path.relpath(os.path.join(r, f), folder): digest(os.path.join(r, f))
            for r, _, fs in os.walk(folder) for f in fs}


def check(out, reference, steps=24):
    """(corrupt checkpoints, journal records lost or doubled, resume not bit-identical, model folder stale)."""
    sys.path.insert(0, ROOT)
    from nanogpt_hf.checkpoint import checkpoint_dirs, verify_checkpoint
    from nanogpt_hf.errors import UserError
    from nanogpt_hf.run_dir import RunDir

    corrupt = 0
    for ckpt in checkpoint_dirs(os.path.join(out, "checkpoints")):
        try:
            verify_checkpoint(ckpt)
        except UserError:
            corrupt += 1
    n_steps = steps
    records, ref = journal(out), journal(reference)
    steps = [r["iter"] for r in records if "train/loss" in r]
    evals = [r["iter"] for r in records if "val/loss" in r]
    ref_evals = [r["iter"] for r in ref if "val/loss" in r]
    lost_or_doubled = abs(len(steps) - n_steps) + sum(steps.count(i) != 1 for i in range(n_steps)) + \
        (evals != ref_evals)
    losses = {r["iter"]: r["train/loss"] for r in records if "train/loss" in r}
    ref_losses = {r["iter"]: r["train/loss"] for r in ref if "train/loss" in r}
    differs = int(losses != ref_losses or digest(os.path.join(out, "model.safetensors"))
                  != digest(os.path.join(reference, "model.safetensors")))
    stale = int(not RunDir(out).model_is_current())
    return corrupt, lost_or_doubled, differs, stale


def sigkill_campaign(tmp, data, reference, table):
    for point in KILL_POINTS:
        out = os.path.join(tmp, "kill-" + point.replace("@", "-"))
        killed = run(out, data, env={"NANOGPT_KILL_AT": point})
        # a resume is seeded differently (only the restored RNG streams can make it match); a restart from scratch
        # (killed before the first checkpoint) is the same command again
        has_ckpt = any(not n.startswith(".") for n in os.listdir(os.path.join(out, "checkpoints")))
        resumed = run(out, data, "--init_from=auto", *(["--seed=4242"] if has_ckpt else []))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        table.append((f"SIGKILL at {point}", killed.returncode == -9, *check(out, reference)))


def plain_resume_campaign(tmp, data, reference, table):
    """Killed runs continued by `--init_from=resume --out_dir=X --max_iters=24` alone: the run's accumulation,
    dropout, data and schedule come back from its checkpoint (they were once the command line's defaults)."""
    for point in ["step@9", "eval@6", "checkpoint@2", "step@22"]:  # each after the first checkpoint
        out = os.path.join(tmp, "plain-" + point.replace("@", "-"))
        killed = run(out, data, env={"NANOGPT_KILL_AT": point})
        resumed = run(out, data, "--init_from=resume", "--max_iters=24", plain=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        table.append((f"SIGKILL at {point}, then the plainest resume", killed.returncode == -9, *check(out, reference)))


def replace_campaign(tmp, data, reference, table):
    """A run to iteration 12 rerun from its checkpoint of 6 to 24 saves iteration 12 again; SIGKILL while the old copy
    is being replaced (after it is set aside, before the new one is in place), then init_from=auto."""
    out = os.path.join(tmp, "replace")
    assert run(out, data, "--keep_last=5", "--max_iters=12").returncode == 0  # checkpoints 6 and 12
    older = os.path.join(out, "checkpoints", "ckpt-0000006")
    killed = run(out, data, "--keep_last=5", "--init_from=resume", f"--resume_from={older}",
                 env={"NANOGPT_KILL_AT": "replace@1"})
    resumed = run(out, data, "--keep_last=5", "--init_from=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    table.append(("SIGKILL while replacing a checkpoint of the same iteration", killed.returncode == -9,
                  *check(out, reference)))


def signal_campaign(tmp, data, table, rng):
    """SIGTERM and SIGINT at random iterations of a longer run, each resumed and compared with one reference."""
    long_args = ["--max_iters=300", "--eval_interval=100"]
    reference = os.path.join(tmp, "long-reference")
    assert run(reference, data, *long_args).returncode == 0
    for sig in [signal.SIGTERM] * 3 + [signal.SIGINT] * 3:
        out = os.path.join(tmp, f"sig-{len(table)}")
        cmd = [sys.executable, TRAIN, *ARGS, *long_args, f"--data_dir={data}", f"--out_dir={out}"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        target = rng.randint(5, 280)
        while proc.poll() is None:  # until the journal shows the target iteration
            if os.path.exists(os.path.join(out, "log.jsonl")) and any(r.get("iter", -1) >= target for r in journal(out)):
                break
            time.sleep(0.01)
        proc.send_signal(sig)
        stdout, _ = proc.communicate(timeout=120)
        resumed = run(out, data, *long_args, "--init_from=auto")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        where = next((ln.split("at iteration ")[1].split(":")[0] for ln in stdout.splitlines()
                      if ln.startswith("stopped by")), "after the end")
        table.append((f"{signal.Signals(sig).name} at iteration {where}", proc.returncode == 128 + sig,
                      *check(out, reference, steps=300)))


def disk_full_campaign(tmp, data, reference, table):
    mount = os.path.join(tmp, "small")
    os.makedirs(mount)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=800k", "tmpfs", mount], check=True)
    try:
        out = os.path.join(mount, "out")
        full = run(out, data)
        one_line = full.returncode == 2 and "Traceback" not in full.stderr and "No space left" in full.stderr
        table.append(("disk full during a checkpoint: one line, exit 2", one_line, 0, 0, 0, 0))
        subprocess.run(["mount", "-o", "remount,size=20m", mount], check=True)
        resumed = run(out, data, "--init_from=auto")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        table.append(("  then space freed, init_from=auto", True, *check(out, reference)))
    finally:
        subprocess.run(["umount", mount], check=False)


BAD_INPUTS = [
    # (extra arguments, message): the config
    (["--learning_rat=1e-3"], "did you mean 'learning_rate'"), (["--batch_size=twelve"], "batch_size must be int"),
    (["--dropout=yes"], "dropout must be float"), (["--learning_rate=nan"], "finite"), (["--weight_decay=nan"], "finite"),
    (["--grad_clip=nan"], "finite"), (["--learning_rate=inf"], "finite"), (["--min_lr=-inf"], "finite"),
    (["--beta1=2"], "beta1 must be in [0, 1)"), (["--beta2=-0.5"], "beta2 must be in [0, 1)"), (["--beta1=1"], "beta1"),
    (["--seed=100000000000000000000000"], "seed"), (["--seed=-1"], "seed"), (["--min_lr=1"], "min_lr"),
    (["--out_dir="], "out_dir is empty"), (["--n_layer=0"], "n_layer must be positive"),
    (["--n_head=-2"], "n_head must be positive"), (["--n_embd=30", "--n_head=4"], "divisible"),
    (["--block_size=0"], "block_size must be positive"), (["--batch_size=0"], "batch_size must be positive"),
    (["--gradient_accumulation_steps=0"], "gradient_accumulation_steps"), (["--eval_interval=0"], "eval_interval"),
    (["--eval_iters=-5"], "eval_iters"), (["--log_interval=0"], "log_interval"), (["--max_iters=-1"], "max_iters"),
    (["--warmup_iters=-1"], "warmup_iters"), (["--keep_last=-1"], "keep_last"), (["--dropout=1.0"], "dropout"),
    (["--dropout=-0.1"], "dropout"), (["--dtype=float8"], "dtype must be one of"), (["--device=tpu"], "device"),
    (["--data_source=tape"], "data_source"), (["--activation_function=relu"], "activation_function"),
    (["--hub_strategy=never"], "hub_strategy"), (["--loggers=mlflow"], "unknown logger"),
    (["--push_to_hub=true"], "hub_model_id"), (["--data_source=streaming"], "stream_dataset"),
    (["--data_source=streaming", "--stream_files=x.txt"], "stream_val_files"), (["--max_iters"], "needs a value"),
    (["--config", "no_such_config"], "not found"), (["--decay_lr=maybe"], "decay_lr must be bool"),
    (["--compile=2"], "compile must be bool"), (["--max_bad_steps=0"], "max_bad_steps"),
    (["--learning_rate=-1e-3"], "learning_rate"), (["stray", "arguments"], "unexpected argument"),
    # the data and the run
    (["--dataset=no_such_dataset", "--data_dir=", "--out_dir=@EMPTY"], "does not exist"), (["--init_from=resume", "--out_dir=@EMPTY"], "no complete checkpoint"),
    (["--init_from=scratch"], "already holds checkpoints"), (["--init_from=resume", "--n_layer=3"], "was trained with n_layer=2"),
    (["--init_from=resume", "--n_embd=64"], "was trained with n_embd=32"), (["--init_from=resume", "--bias=true"], "was trained with bias"),
    (["--init_from=resume", "--activation_function=gelu_new"], "activation_function"),
    (["--init_from=resume", "--block_size=16"], "was trained with block_size"),
    (["--init_from=/no/such/folder", "--out_dir=@EMPTY"], "no such model folder"),
    (["--init_from=out", "--out_dir=@EMPTY"], "no such model folder"),
    (["--init_from=resume", "--resume_from=/no/such/run"], "no complete checkpoint"),
    (["--init_from=resume", "--data_dir=@BPE"], "prepared with GPT-2 BPE"),
    (["--data_dir=@NOMETA", "--out_dir=@EMPTY"], "meta.json is missing"),
    (["--data_dir=@EMPTYBIN", "--out_dir=@EMPTY"], "holds 0 tokens but meta.json says"),
    (["--data_dir=@ODDBIN", "--out_dir=@EMPTY"], "odd number of bytes"),
    (["--data_dir=@BIGIDS", "--out_dir=@EMPTY"], "outside meta.json's vocabulary"),
    (["--data_dir=@BADMETA", "--out_dir=@EMPTY"], "meta.json is unreadable"),
    (["--init_from=resume", "--resume_from=@DAMAGED"], "does not match its manifest"),
    # untrusted input: a pulled training state, a downloaded model folder, data edited in place, a diverging run
    (["--init_from=resume", "--resume_from=@CRAFTED"], "not a plain path inside the checkpoint"),
    (["--init_from=@EVIL", "--out_dir=@EMPTY"], "runs only with --trust_remote_code=true"),
    (["--data_dir=@SHIFTED", "--out_dir=@EMPTY"], "content fingerprint differs"),
    (["--init_from=resume", "--out_dir=@DIVERGE", "--max_iters=60", "--learning_rate=1e9", "--decay_lr=false",
      "--grad_clip=0"], "training diverged"),
    # folders and values as users receive them (the folders issue)
    (["--init_from=@HUGE", "--out_dir=@EMPTY"], "its config.json describes a model of"),
    (["--init_from=@LISTCONFIG", "--out_dir=@EMPTY"], "holds a JSON list, not a model config"),
    (["--init_from=resume", "--resume_from=@BADSTATE"], "iter_num is '5', not a whole number"),
    (["--init_from=resume", "--resume_from=@NEGSTATE"], "iter_num is -100, not a whole number"),
    (["--stream_files=&a [1,*a]"], "anchors and aliases"), (["--stream_files=[1,[2]]"], "must be a list of strings"),
    (["--init_from=resume", "--n_embd=63"], "must be divisible by n_head (2)"),
]


def _folders_users_receive(reference, tmp, folders):
    """@HUGE: a model folder whose config.json says 1e9 layers; @LISTCONFIG: a config.json that is a JSON list;
    @BADSTATE/@NEGSTATE: a run whose newest trainer_state.json holds a string / a negative iter_num (manifest
    consistent, as a crafted upload's would be)."""
    import shutil

    from nanogpt_hf.checkpoint import write_manifest

    for name, edit in (("@HUGE", lambda c: {**c, "n_layer": 1_000_000_000}), ("@LISTCONFIG", lambda c: [1, 2])):
        folders[name] = os.path.join(tmp, name[1:].lower())
        shutil.copytree(reference, folders[name])
        path = os.path.join(folders[name], "config.json")
        json.dump(edit(json.load(open(path))), open(path, "w"))
    for name, value in (("@BADSTATE", "5"), ("@NEGSTATE", -100)):
        folders[name] = os.path.join(tmp, name[1:].lower())
        shutil.copytree(reference, folders[name])
        ckpt = os.path.join(folders[name], "checkpoints", sorted(os.listdir(os.path.join(folders[name], "checkpoints")))[-1])
        state = json.load(open(os.path.join(ckpt, "trainer_state.json")))
        json.dump({**state, "iter_num": value}, open(os.path.join(ckpt, "trainer_state.json"), "w"))
        write_manifest(ckpt)


def bad_input_campaign(tmp, data, reference, table):
    import shutil

    from nanogpt_hf.prepare import prepare_shakespeare

    folders = {"@EMPTY": os.path.join(tmp, "empty-out"), "@BPE": os.path.join(tmp, "bpe"),
               "@NOMETA": os.path.join(tmp, "nometa"), "@EMPTYBIN": os.path.join(tmp, "emptybin"),
               "@BADMETA": os.path.join(tmp, "badmeta"), "@DAMAGED": os.path.join(tmp, "damaged"),
               "@ODDBIN": os.path.join(tmp, "oddbin"), "@BIGIDS": os.path.join(tmp, "bigids")}
    prepare_shakespeare(folders["@BPE"])
    for name in ("@NOMETA", "@EMPTYBIN", "@BADMETA", "@ODDBIN", "@BIGIDS"):
        shutil.copytree(data, folders[name])
    with open(os.path.join(folders["@ODDBIN"], "val.bin"), "ab") as f:
        f.write(b"x")
    with open(os.path.join(folders["@BIGIDS"], "train.bin"), "r+b") as f:  # random bytes where token ids belong
        f.write(os.urandom(4096))
    os.remove(os.path.join(folders["@NOMETA"], "meta.json"))
    open(os.path.join(folders["@EMPTYBIN"], "train.bin"), "wb").close()
    open(os.path.join(folders["@BADMETA"], "meta.json"), "w").write("{not json")
    shutil.copytree(reference, folders["@DAMAGED"])
    folders.update({"@CRAFTED": os.path.join(tmp, "crafted"), "@EVIL": os.path.join(tmp, "evil"),
                    "@SHIFTED": os.path.join(tmp, "shifted"), "@DIVERGE": os.path.join(tmp, "diverge")})
    shutil.copytree(reference, folders["@CRAFTED"])
    shutil.copytree(reference, folders["@DIVERGE"])
    crafted = os.path.join(folders["@CRAFTED"], "checkpoints",
                           sorted(os.listdir(os.path.join(folders["@CRAFTED"], "checkpoints")))[-1], "MANIFEST.json")
    manifest = json.load(open(crafted))
    manifest["files"]["../../../../dev/zero"] = {"size": 1 << 40, "sha256": "0" * 64}
    json.dump(manifest, open(crafted, "w"))
    shutil.copytree(reference, folders["@EVIL"])  # its model folder, with a tokenizer naming code of its own
    mark = os.path.join(tmp, "EVIL-RAN")
    open(os.path.join(folders["@EVIL"], "evil.py"), "w").write(f"open({mark!r}, 'w')\n")
    tok_config = json.load(open(os.path.join(folders["@EVIL"], "tokenizer_config.json")))
    tok_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    json.dump(tok_config, open(os.path.join(folders["@EVIL"], "tokenizer_config.json"), "w"))
    shutil.copytree(data, folders["@SHIFTED"])
    import numpy as np

    tokens = np.fromfile(os.path.join(folders["@SHIFTED"], "train.bin"), dtype=np.uint16)
    ((tokens + 1) % 65).astype(np.uint16).tofile(os.path.join(folders["@SHIFTED"], "train.bin"))
    newest = sorted(os.listdir(os.path.join(folders["@DAMAGED"], "checkpoints")))[-1]
    with open(os.path.join(folders["@DAMAGED"], "checkpoints", newest, "optimizer.safetensors"), "r+b") as f:
        f.truncate(100)
    _folders_users_receive(reference, tmp, folders)
    watched = [reference, data, folders["@BPE"]]
    before = [tree_digest(w) for w in watched]
    for extra, message in BAD_INPUTS:
        extra = [a.split("=")[0] + "=" + folders[a.split("=")[1]] if "=@" in a else a for a in extra]
        proc = subprocess.run([sys.executable, TRAIN, *ARGS, f"--data_dir={data}", f"--out_dir={reference}", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        ok = proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1 and message in errors[0]
        table.append((f"bad input {' '.join(extra)}", ok, 0, 0, 0, 0))
    table.append(("  run folder and data folders unchanged (sha256 of every file)",
                  before == [tree_digest(w) for w in watched], 0, 0, 0, 0))
    diverged = os.path.join(folders["@DIVERGE"], "checkpoints")
    table.append(("  no code ran unasked; the diverged run wrote no checkpoint",
                  not os.path.exists(mark) and sorted(os.listdir(diverged)) == sorted(
                      os.listdir(os.path.join(reference, "checkpoints"))), 0, 0, 0, 0))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--disk_full", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="sigkill,plain,replace,signals,bad_inputs",
                   help="comma list of: sigkill, plain, replace, signals, bad_inputs (disk_full by its flag)")
    args = p.parse_args()
    only = set(args.only.split(","))
    sys.path.insert(0, ROOT)
    from nanogpt_hf.prepare import prepare_shakespeare_char

    table = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        prepare_shakespeare_char(data)
        reference = os.path.join(tmp, "reference")
        assert run(reference, data).returncode == 0
        if "sigkill" in only:
            sigkill_campaign(tmp, data, reference, table)
        if "plain" in only:
            plain_resume_campaign(tmp, data, reference, table)
        if "replace" in only:
            replace_campaign(tmp, data, reference, table)
        if "signals" in only:
            signal_campaign(tmp, data, table, random.Random(args.seed))
        if args.disk_full:
            disk_full_campaign(tmp, data, reference, table)
        if "bad_inputs" in only:
            bad_input_campaign(tmp, data, reference, table)
    print("| fault | as expected | corrupt checkpoints | journal records lost or doubled | resume not bit-identical | "
          "model folder stale |")
    print("|---|---|---|---|---|---|")
    for name, ok, *counts in table:
        print(f"| {name} | {'yes' if ok else 'NO'} | " + " | ".join(str(c) for c in counts) + " |")
    failures = sum((not ok) or any(counts) for _, ok, *counts in table)
    print(f"\n{len(table)} cases, {failures} not as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
