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
import re
import shutil
import socket

import yaml

from .checkpoint import CKPT_PREFIX, MANIFEST, checkpoint_dirs, latest_checkpoint, sha256_of
from .errors import UserError
from .faults import fault_point
from .fileio import atomic_path

__all__ = ["RunDir"]

MODEL_TMP_PREFIX = ".model-tmp-"
TMP_PREFIX, OLD_PREFIX = ".tmp-", ".old-"  # a checkpoint being written; an older copy being replaced
PUSH_PREFIX = ".push-"  # what a Hub push uploads, staged (hub.push_after_save); the push removes it when done
ATOMIC_LEFTOVER = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")  # fileio.atomic_path's temporary names


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

    # ----------------------------------------------------------------------------------------- ownership
    def acquire(self):
        """Creates the folder and takes its lock for the life of this process; a second trainer gets one line."""
        try:
            os.makedirs(self.checkpoints, exist_ok=True)
            f = open(self.lock_path, "a+", encoding="utf-8")
        except OSError as e:
            raise UserError(f"out_dir {self.path} is not writable ({e.strerror}): choose another out_dir") from e
        try:
            self._lock(f, fcntl.LOCK_EX)
        except UserError:
            f.close()
            raise
        self._lock_file = f
        self.name_holder()

    def name_holder(self):
        """Writes this process into the lock file (what a refused second trainer is told). A forked checkpoint writer
        (launch.outliving_the_launcher) inherits the lock and names itself."""
        f = self._lock_file
        if f is not None:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()

    def refuse_if_in_use(self):
        """The lock's refusal, read-only and before anything is built or printed (acquire() takes the lock later, once
        the run is known to start; a trainer that starts in between is still refused there)."""
        try:
            f = open(self.lock_path, encoding="utf-8")
        except OSError:  # no lock file: no trainer ever held the folder
            return
        with f:
            self._lock(f, fcntl.LOCK_SH)  # released when f closes

    def _lock(self, f, mode):
        """flock of the lock file without waiting; a held one is one line naming its holder."""
        try:
            fcntl.flock(f.fileno(), mode | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"out_dir {self.path} is in use by another trainer ({holder}): wait for it to finish, or "
                            f"choose another out_dir") from e

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
        """Finishes or removes what interrupted writes left; returns one line per thing done. A complete checkpoint
        (manifest written) whose rename into place was interrupted is put in place; an older copy of the same
        iteration set aside during that rename is removed, or put back when the new one never arrived; temporary
        model folders, unfinished checkpoints and half-written journal or config files are removed."""
        done = []
        if os.path.isdir(self.checkpoints):
            for name in sorted(os.listdir(self.checkpoints)):
                path = os.path.join(self.checkpoints, name)
                final = os.path.join(self.checkpoints, name.split("-", 1)[-1])
                if name.startswith(TMP_PREFIX) and os.path.exists(os.path.join(path, MANIFEST)) and not os.path.exists(final):
                    os.replace(path, final)
                    done.append(f"put {os.path.basename(final)} in place (complete; its rename had been interrupted)")
                elif name.startswith(TMP_PREFIX):
                    shutil.rmtree(path, ignore_errors=True)
                    done.append(f"removed {name}, left by an interrupted write")
            for name in sorted(os.listdir(self.checkpoints)):  # after the above: the new copy is in place if it exists
                if name.startswith(OLD_PREFIX):
                    path, final = os.path.join(self.checkpoints, name), os.path.join(self.checkpoints, name[len(OLD_PREFIX):])
                    if os.path.exists(final):
                        shutil.rmtree(path, ignore_errors=True)
                        done.append(f"removed {name}, replaced by a newer copy of the same iteration")
                    else:
                        os.replace(path, final)
                        done.append(f"restored {os.path.basename(final)}, whose replacement was interrupted")
        if os.path.isdir(self.path):
            for name in os.listdir(self.path):
                path = os.path.join(self.path, name)
                if name.startswith(MODEL_TMP_PREFIX) or ATOMIC_LEFTOVER.fullmatch(name):
                    if os.path.isdir(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.remove(path)
                    done.append(f"removed {name}, left by an interrupted write")
        return done

    def put_checkpoint(self, tmp, final):
        """Renames a complete checkpoint folder into place. The same iteration saved again (a rerun from an older
        checkpoint) replaces the old copy without a moment where neither is whole: the old one is set aside first,
        removed last, and clean_leftovers finishes the job after a crash in between."""
        old = os.path.join(self.checkpoints, OLD_PREFIX + os.path.basename(final))
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            fault_point("replace")  # the old copy set aside, the new one not yet in place
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

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
        """Whether out_dir's model files are the newest checkpoint's, every one (through the checkpoint's manifest).
        A newest checkpoint whose manifest is unreadable cannot say: the model folder is left as it is (True)."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return True
        try:
            with open(os.path.join(ckpt, MANIFEST), encoding="utf-8") as f:
                files = dict(json.load(f)["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return True
        prefix = "model/"
        for rel, meta in files.items():
            if isinstance(rel, str) and isinstance(meta, dict) and rel.startswith(prefix) and "/" not in rel[len(prefix):]:
                mine = os.path.join(self.path, rel[len(prefix):])
                if not os.path.isfile(mine) or os.path.getsize(mine) != meta.get("size") or sha256_of(mine) != meta.get("sha256"):
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
    def latest_state(self, ckpt=None):
        """The trainer_state.json of ckpt (by default the newest complete checkpoint): iteration, losses and the
        iteration they were measured at; None without a checkpoint or when it is unreadable."""
        ckpt = ckpt or self.latest_checkpoint()
        if ckpt is None:
            return None
        try:
            with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and isinstance(state.get("iter_num"), int) else None

    def summary(self):
        """One line: which iteration the model folder holds, its val loss, and where the best one is."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return f"{self.path}: no checkpoint yet (the run has not reached its first save)"
        state = self.latest_state(ckpt)
        if state is None:
            return f"{self.path}: {ckpt}/trainer_state.json is unreadable"
        line = f"model folder {self.path} holds iteration {state['iter_num']}"
        if state.get("val_loss") is not None:  # measured at eval_iter: earlier than iter_num after a stop signal
            measured = state.get("eval_iter")
            at = "" if measured in (None, state["iter_num"]) else f", measured at iteration {measured}"
            line += f" (val loss {state['val_loss']:.4f}{at})"
        best = state.get("best_checkpoint")
        if best and os.path.basename(best) != os.path.basename(ckpt):
            line += (f"; the best val loss {state['best_val_loss']:.4f} is iteration {int(best.rsplit('-', 1)[1])}, "
                     f"kept in {os.path.join(self.checkpoints, os.path.basename(best))}")
        return line
