"""The run folder (out_dir): the one module that knows its layout, and its owner while a trainer runs.

    out_dir/
      config.json, model.safetensors, tokenizer*, *.py   the model folder: always the newest checkpoint's weights
      checkpoints/ckpt-0000500/                           training state (layout in checkpoint.py)
      log.jsonl                                           the journal: one JSON record per line, appended
      train_config.yaml                                   the run's resolved config
      .lock                                               flock-ed by the trainer that owns the folder

The lock is an flock: the kernel drops it when its process dies, so a kill -9 never leaves a stale lock. The
journal is appended line by line; a torn last line (power loss, disk full) is dropped with a warning, never a
reason to refuse a resume. The trainer, nanogpt-plot, the Hub push and nanogpt-bench read the folder through here.
"""

import errno
import fcntl
import json
import os
import shutil
import socket

import yaml

from .checkpoint import CKPT_PREFIX, MANIFEST, checkpoint_dirs, fault_point, latest_checkpoint, sha256_of
from .errors import UserError
from .fileio import atomic_path

__all__ = ["RunDir"]

MODEL_TMP_PREFIX = ".model-tmp-"


class RunDir:
    def __init__(self, path):
        self.path = path
        self.checkpoints = os.path.join(path, "checkpoints")
        self.log_path = os.path.join(path, "log.jsonl")
        self.config_path = os.path.join(path, "train_config.yaml")
        self.lock_path = os.path.join(path, ".lock")
        self._lock_file = None

    # -------------------------------------------------------------------------------------------- layout
    def checkpoint_path(self, iter_num):
        return os.path.join(self.checkpoints, f"{CKPT_PREFIX}{iter_num:07d}")

    def complete_checkpoints(self):
        return checkpoint_dirs(self.checkpoints)

    def latest_checkpoint(self):
        return latest_checkpoint(self.checkpoints)

    def has_model(self):
        return os.path.isfile(os.path.join(self.path, "config.json"))

    # ----------------------------------------------------------------------------------------- ownership
    def acquire(self):
        """Creates the folder and takes its lock for the life of this process; a second trainer gets one line."""
        try:
            os.makedirs(self.checkpoints, exist_ok=True)
            f = open(self.lock_path, "a+", encoding="utf-8")
        except OSError as e:
            raise UserError(f"out_dir {self.path} is not writable ({e.strerror}): choose another out_dir") from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise UserError(f"out_dir {self.path} is in use by another trainer ({holder}): wait for it to finish, "
                            f"or choose another out_dir") from e
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._lock_file = f

    def release(self):
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None

    def probe_writable(self):
        """Fails now, with one line, where a checkpoint would fail after eval_interval steps of work."""
        for folder in (self.path, self.checkpoints):
            probe = os.path.join(folder, f".write-probe-{os.getpid()}")
            try:
                with open(probe, "w") as f:
                    f.write("ok")
                os.remove(probe)
            except OSError as e:
                raise UserError(f"{folder} is not writable ({e.strerror}): fix its permissions or free disk space, "
                                f"or choose another out_dir") from e

    def free_bytes(self):
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def clean_leftovers(self):
        """Removes what interrupted writes left: temporary model folders and unfinished checkpoints."""
        removed = []
        for root, prefix in ((self.path, MODEL_TMP_PREFIX), (self.checkpoints, ".tmp-")):
            if os.path.isdir(root):
                for name in os.listdir(root):
                    if name.startswith(prefix):
                        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                        removed.append(name)
        return removed

    # ------------------------------------------------------------------------------------------ journal
    def read_log(self, warn=None):
        """The journal's records; a torn or garbage line is skipped (with a warning) instead of raising."""
        if not os.path.exists(self.log_path):
            raise UserError(f"{self.log_path} does not exist: nothing has been trained into {self.path}")
        records = []
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
                    if warn:
                        warn(f"warning: {self.log_path} line {n} is damaged (torn write?): dropped")
                    continue
                records.append(record)
        return records

    def rewind_log(self, iter_num, warn):
        """Before training resumes from iteration iter_num: keep every record before it and its evaluation (the
        steps after it are replayed and logged again). iter_num None is a fresh start: an empty journal."""
        if not os.path.exists(self.log_path):
            return
        kept = [] if iter_num is None else [
            r for r in self.read_log(warn) if r["iter"] < iter_num or (r["iter"] == iter_num and "val/loss" in r)]
        with atomic_path(self.log_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def open_log(self):
        """The journal opened for appending, line-buffered: each record reaches the file as it is written."""
        return open(self.log_path, "a", encoding="utf-8", buffering=1)

    # ------------------------------------------------------------------------------------ config, model
    def write_config(self, config_dict):
        with atomic_path(self.config_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            yaml.safe_dump(config_dict, f, sort_keys=False)

    def publish_model(self, checkpoint):
        """Makes out_dir's model folder equal to the checkpoint's model/ folder, file by file (each renamed in)."""
        source = os.path.join(checkpoint, "model")
        tmp = os.path.join(self.path, f"{MODEL_TMP_PREFIX}{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        for n, name in enumerate(sorted(os.listdir(tmp))):
            os.replace(os.path.join(tmp, name), os.path.join(self.path, name))
            if n == 0:
                fault_point("publish_file")  # a half-refreshed model folder
        os.rmdir(tmp)

    def model_is_current(self):
        """Whether out_dir's model files are the newest checkpoint's, every one (through the checkpoint's manifest)."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return True
        with open(os.path.join(ckpt, MANIFEST), encoding="utf-8") as f:
            files = json.load(f)["files"]
        prefix = "model" + os.sep
        for rel, meta in files.items():
            if rel.startswith(prefix):
                mine = os.path.join(self.path, rel[len(prefix):])
                if not os.path.exists(mine) or os.path.getsize(mine) != meta["size"] or sha256_of(mine) != meta["sha256"]:
                    return False
        return True

    def repair_model(self, warn):
        """At start: a crash between a checkpoint's rename and the model refresh left older weights in out_dir."""
        if not self.model_is_current():
            ckpt = self.latest_checkpoint()
            warn(f"warning: {self.path}'s model files were older than {os.path.basename(ckpt)} (interrupted refresh): "
                 f"restored from it")
            self.publish_model(ckpt)

    # ------------------------------------------------------------------------------------------ summary
    def summary(self):
        """One line: which iteration the model folder holds, its val loss, and where the best one is."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return f"{self.path}: no checkpoint yet (the run has not reached its first save)"
        with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        line = f"model folder {self.path} holds iteration {state['iter_num']}"
        if state.get("val_loss") is not None:
            line += f" (val loss {state['val_loss']:.4f})"
        best = state.get("best_checkpoint")
        if best and os.path.basename(best) != os.path.basename(ckpt):
            line += (f"; the best val loss {state['best_val_loss']:.4f} is iteration {int(best.rsplit('-', 1)[1])}, "
                     f"kept in {os.path.join(self.checkpoints, os.path.basename(best))}")
        return line
