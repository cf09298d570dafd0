"""Crash-safe training checkpoints without pickle.

Layout of out_dir/checkpoints/ckpt-0000500/:
  model/                       the HF model folder (config.json, model.safetensors, code) of the weights
  optimizer.safetensors/.json  optimizer state by parameter name, every tensor whole (FSDP shards gathered), so it
                               loads on any number of processes and any sharding; param groups in JSON
  rank{r}.safetensors/.json    per-rank RNG streams (torch, CUDA, numpy, python) and data position
  trainer_state.json           iteration, best val loss, tokens seen, config, tracker run ids
  MANIFEST.json                every file above with its size and sha256; written last

A checkpoint is assembled in a hidden temporary folder and renamed into place only once MANIFEST.json is
written, so a crash at any point leaves either the previous set of checkpoints or a complete new one; a folder
without a manifest is never picked for resume, and one whose files do not match their manifest is refused.
Old checkpoints are deleted only after the new one is in place (keep_last newest plus the best by val loss).
Everything is safetensors or JSON: nothing here unpickles, so a crafted file cannot run code.
"""

import errno
import hashlib
import json
import os
import random
import re
import shutil
import stat

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .faults import fault_point
from .optim import optimizer_state, whole_tensor
from .tensor_files import SAFETENSORS_DTYPES, read_whole, tensors_in_file

__all__ = ["save_tree", "load_tree", "rng_state", "set_rng_state",
           "write_manifest", "verify_checkpoint", "checkpoint_dirs", "latest_checkpoint", "prune_checkpoints", "fault_point", "sha256_of", "CKPT_PREFIX",
           "MANIFEST", "save_checkpoint"]

CKPT_PREFIX = "ckpt-"
MANIFEST = "MANIFEST.json"


# ------------------------------------------------------------------------------------ state <-> files
def _split(obj, tensors, prefix):
    """JSON skeleton of obj; tensors and arrays are moved into `tensors` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj  # as it is: save_tree copies it to the CPU, stream_tree gathers it first
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _split(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _join(obj, tensors):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return read_whole(tensors[obj["__ndarray__"]]).numpy()
        if "__items__" in obj:
            return {k: _join(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_tree(path_stem, obj):
    """Writes obj (nested dicts/lists/tuples of tensors, arrays and JSON values) as STEM.safetensors + STEM.json."""
    tensors = {}
    skeleton = _split(obj, tensors, "t")
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, path_stem + ".safetensors")
    with open(path_stem + ".json", "w", encoding="utf-8") as f:
        json.dump(skeleton, f)


def stream_tree(path_stem, obj, whole, write):
    """save_tree's files, written one tensor at a time: whole(t) gives each stored tensor whole on the CPU (a gather
    every rank joins, under FSDP); only where write is true is it written, and freed before the next, so a rank's
    host memory holds about one tensor, not the whole state. The header comes first, from the shapes alone. A
    failed write stops the writing, not the gathering (the other ranks are in the same collectives), and is
    raised at the end."""
    tensors = {}
    skeleton = _split(obj, tensors, "t")
    header, offset = {}, 0
    for key, t in tensors.items():
        size = t.numel() * t.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    failed, f = None, None
    if write:
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data on 8 bytes
        try:
            f = open(path_stem + ".safetensors", "wb")
            f.write(len(raw).to_bytes(8, "little") + raw)
        except OSError as e:
            failed = e
    for t in tensors.values():
        value = whole(t)
        if f is not None and failed is None:
            try:
                f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            except OSError as e:
                failed = e
        del value
    if f is not None:
        try:
            f.close()
        except OSError as e:
            failed = failed or e
    if failed is None and write:
        try:
            with open(path_stem + ".json", "w", encoding="utf-8") as out:
                json.dump(skeleton, out)
        except OSError as e:
            failed = e
    if failed is not None:
        raise failed


def load_tree(path_stem, lazy=False):
    """save_tree's obj back. lazy=True: each tensor is left in the file as a TensorInFile, read when asked for, and
    then only the rows asked for (optim._like: a sharded resume reads each rank's rows alone)."""
    try:
        tensors = tensors_in_file(path_stem + ".safetensors") if lazy else load_file(path_stem + ".safetensors")
        with open(path_stem + ".json", encoding="utf-8") as f:
            skeleton = json.load(f)
    except (OSError, SafetensorError, json.JSONDecodeError, ValueError, KeyError) as e:
        raise UserError(f"{path_stem}: unreadable checkpoint file ({e}); resume from another checkpoint") from e
    return _join(skeleton, tensors)


# ------------------------------------------------------------------------------------ RNG streams
# Each rank saves the RNG state of its own GPU alone: a table of every visible GPU's (get_rng_state_all) in every
# rank's file restored with set_rng_state_all fails on fewer GPUs (IndexError resuming an 8-GPU run on 1). `cuda` is
# torch.cuda; tests pass a table of simulated devices.
def rng_state(cuda=torch.cuda):
    py = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": [py[0], list(py[1]), py[2]]}
    if cuda.is_available():
        state["cuda"] = cuda.get_rng_state(cuda.current_device())
    return state


def set_rng_state(state, cuda=torch.cuda):
    torch.set_rng_state(state["torch"])
    np.random.set_state(tuple(state["numpy"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state.get("cuda")
    if saved is not None and cuda.is_available():
        device = cuda.current_device()
        if isinstance(saved, (list, tuple)):  # earlier checkpoints: every visible GPU's; this rank's, where it exists
            saved = saved[device] if device < len(saved) else saved[0]
        cuda.set_rng_state(saved, device)


# ------------------------------------------------------------------------------------ manifest
def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder):
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MANIFEST:
                yield rel, path


def write_manifest(folder):
    """Lists every file with size and sha256, fsyncs them, then writes MANIFEST.json (the completion mark)."""
    entries = {}
    umask = os.umask(0)
    os.umask(umask)
    for rel, path in sorted(_files(folder)):
        os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600; the rest of the folder is 0644 under umask 022
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        entries[rel] = {"size": os.path.getsize(path), "sha256": sha256_of(path)}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def _refuse(folder, why):
    raise UserError(f"checkpoint {folder} is damaged or crafted: {why}; resume from another checkpoint")


def _checked_files(folder, entries):
    """{relative path: (path, size, sha256)} of the manifest's entries, each checked to be a plain relative path to a
    regular file inside the checkpoint, and the folder to hold nothing else: no `..`, no absolute path, no link,
    no device, no unlisted file. Nothing is opened before every entry passes, so a crafted manifest (a pulled
    training state naming /dev/zero or ../../secret) is refused at once."""
    if not isinstance(entries, dict):
        _refuse(folder, f"{MANIFEST} holds no file list")
    checked = {}
    for rel, meta in entries.items():
        parts = rel.split("/") if isinstance(rel, str) else []
        if not parts or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
            _refuse(folder, f"{MANIFEST} names {rel!r}, which is not a plain path inside the checkpoint")
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)):
            _refuse(folder, f"{MANIFEST} has no size and sha256 for {rel}")
        checked[rel] = (os.path.join(folder, *parts), meta["size"], meta["sha256"])
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                _refuse(folder, f"{rel} is a link or a device, not a file")
            if stat.S_ISREG(mode) and rel not in checked and rel != MANIFEST:
                _refuse(folder, f"{rel} is not in its manifest")
    return checked


def verify_checkpoint(folder):
    """Raises UserError unless the folder holds exactly the files its manifest lists, each with its size and sha256."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise UserError(f"{folder} is incomplete (no {MANIFEST}): it was being written when the run stopped")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is unreadable ({e}); resume from another checkpoint") from e
    files = _checked_files(folder, entries)
    for rel, (file, size, _) in files.items():
        if not os.path.exists(file):
            _refuse(folder, f"{rel} is missing")
        if os.path.getsize(file) != size:
            _refuse(folder, f"{rel} does not match its manifest (truncated or edited)")
    for rel, (file, _, digest) in files.items():  # hashing last: every size already matched
        if sha256_of(file) != digest:
            _refuse(folder, f"{rel} does not match its manifest (truncated or edited)")
    return folder


# ------------------------------------------------------------------------------------ finding, pruning
def checkpoint_dirs(ckpt_root):
    """Complete checkpoints (with a manifest), oldest first by iteration."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = re.fullmatch(CKPT_PREFIX + r"(\d+)", name)
        if m and os.path.exists(os.path.join(ckpt_root, name, MANIFEST)):
            found.append((int(m.group(1)), os.path.join(ckpt_root, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(ckpt_root):
    dirs = checkpoint_dirs(ckpt_root)
    return dirs[-1] if dirs else None


def prune_checkpoints(ckpt_root, keep_last, best=None):
    """Deletes all but the keep_last newest complete checkpoints and the best one (its folder name: where the run
    folder is now, wherever it was when the best was recorded); also leftover temporaries."""
    dirs = checkpoint_dirs(ckpt_root)
    keep = set(dirs[-keep_last:]) if keep_last > 0 else set()
    if best:
        keep.add(os.path.join(ckpt_root, os.path.basename(best)))
    if dirs:
        keep.add(dirs[-1])  # the newest always stays: it is what resume needs
    for path in dirs:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(ckpt_root):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)


# ------------------------------------------------------------------------------------ writing one
def save_checkpoint(accelerator, model, optimizers, train_source, tokenizer, run, record, keep_last, best=None,
                    detach=False):
    """Writes checkpoints/ckpt-N (N = record["iter_num"]; record becomes trainer_state.json) atomically, then makes
    out_dir's model folder equal to it. `model` is the prepared model (not a torch.compile wrapper: its state dict
    would carry `_orig_mod.` names). Returns the path, or None when a weight is not finite on some rank: such a state
    is never written. A full disk or a permission error is one UserError on every rank; the previous checkpoint stays
    intact. Every rank calls this (under FSDP the shards are gathered). detach=True (a stop signal's checkpoint): the
    state is gathered here, on the CPU, and the files are written by a forked child that the launcher's kill after
    its grace cannot reach (launch.outliving_the_launcher)."""
    from .launch import outliving_the_launcher, together

    raw = accelerator.unwrap_model(model, keep_torch_compile=False)
    finite = torch.tensor(float(all(torch.isfinite(_local(p)).all() for p in raw.parameters())), device=accelerator.device)
    if accelerator.reduce(finite, reduction="sum").item() < accelerator.num_processes:
        return None
    final = run.checkpoint_path(record["iter_num"])
    tmp = os.path.join(run.checkpoints, f".tmp-{os.path.basename(final)}")
    placed = []  # set once the checkpoint is in place: a later failure is the model folder's refresh alone

    def writing(step):  # a failed write: the temporary folder goes, the error is one line on every rank
        try:
            step()
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = _reason(e)
            if placed:
                raise UserError(f"checkpoint {final} is complete, but the model folder {run.path} could not be refreshed "
                                f"from it ({reason}): free disk space, then continue with init_from=auto (the model "
                                f"folder is restored from the checkpoint at start)") from e
            previous = run.latest_checkpoint()
            raise UserError(f"cannot write checkpoint {final} ({reason}); "
                            f"{'the previous one, ' + previous + ', is intact' if previous else 'nothing was saved'}: "
                            f"{_remedy(e)}, then continue with init_from=auto") from e

    def begin():
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            fault_point("checkpoint_begin")  # an empty temporary folder

    def rank_state():
        save_tree(os.path.join(tmp, f"rank{accelerator.process_index}"), {"rng": rng_state(), "data": train_source.state_dict()})

    def main_part():
        if not accelerator.is_main_process:
            return
        raw.save_pretrained(os.path.join(tmp, "model"), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(tmp, "model"))
        fault_point("checkpoint")  # half-written: weights there, the manifest not yet
        if detach:
            save_tree(os.path.join(tmp, "optimizer"), optimizer_whole)
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        fault_point("checkpoint_manifest")  # every file written, no manifest yet
        write_manifest(tmp)
        run.put_checkpoint(tmp, final)
        placed.append(final)
        fault_point("publish")  # in place, the model folder not yet refreshed: repaired at the next start
        prune_checkpoints(run.checkpoints, keep_last, best)
        run.publish_model(final)

    def on_disk():  # after a writer was killed
        newest = run.latest_checkpoint()
        return (f"on disk: {'the newest complete checkpoint is ' + newest if newest else 'no complete checkpoint'}; "
                f"the partial {tmp} is never taken as one (removed at the next start)")

    if detach and accelerator.num_processes == 1:
        # one process: nothing to do with others, so everything is written by the detached writer, forked at once
        # (a second SIGTERM 0.3 s after the first kills this process, not the writer); a GPU's tensors are copied
        # to the CPU first (the writer cannot use the GPU)
        state_dict = {k: v.detach().cpu() for k, v in _without_tied(raw, accelerator.get_state_dict(model)).items()}
        optimizer_whole = optimizer_state(raw, optimizers)
        rank = {"rng": rng_state(), "data": train_source.state_dict()}

        def all_detached():
            run.name_holder()
            writing(begin)
            writing(lambda: save_tree(os.path.join(tmp, "rank0"), rank))
            writing(main_part)

        outliving_the_launcher(all_detached, on_disk)
        return final
    together(accelerator, lambda: writing(begin))
    together(accelerator, lambda: writing(rank_state))
    state_dict = accelerator.get_state_dict(model)  # collectives under FSDP: every rank calls them
    state_dict = _without_tied(raw, state_dict)
    if detach:  # gathered whole on the writing rank: the forked writer cannot join collectives
        optimizer_whole = optimizer_state(raw, optimizers, keep=accelerator.is_main_process)
    else:  # streamed to the file tensor by tensor, every rank in each gather, the writing rank alone keeping one
        together(accelerator, lambda: writing(lambda: stream_tree(
            os.path.join(tmp, "optimizer"), optimizer_state(raw, optimizers, whole=False),
            lambda t: whole_tensor(t, keep=accelerator.is_main_process), accelerator.is_main_process)))
    if detach and accelerator.is_main_process:
        state_dict = {k: v.cpu() for k, v in state_dict.items()}  # the child cannot use the GPU (a no-op on a CPU)

        def main_part_detached():
            run.name_holder()
            writing(main_part)

        together(accelerator, lambda: outliving_the_launcher(main_part_detached, on_disk))
    else:
        together(accelerator, lambda: writing(main_part))
    return final


def _without_tied(raw, state_dict):
    """FSDP's full state dict holds the tied head as a copy: saved once, like one process."""
    if raw.config.tie_word_embeddings:
        for key in getattr(raw, "_tied_weights_keys", None) or {}:
            state_dict.pop(key, None)
    return state_dict


def _remedy(error):
    """What to do about a failed write, by its cause (shutil.copytree's Error holds each file's)."""
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        text = str(error.args[0][0][-1])
        code = next((c for c, name in ((errno.ENOSPC, "No space"), (errno.EACCES, "Permission denied")) if name in text),
                    None)
    else:
        code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space (or raise the quota)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "fix out_dir's permissions (or choose another out_dir)"
    return "fix what the error names"


def _reason(error):
    """The OS's words for a failed write ("No space left on device"); shutil.copytree's Error lists every file's."""
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list) and error.args[0]:
        found = re.search(r"\[Errno \d+\] ([^:]+)", str(error.args[0][0][-1]))
        return found.group(1) if found else str(error.args[0][0][-1])
    return getattr(error, "strerror", None) or str(error)


def _local(tensor):
    """This rank's part of a parameter (FSDP2 shards are DTensors)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
