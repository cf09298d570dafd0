"""Resolving a run before anything is built, and restoring it from its checkpoint.

The trainer (train.py) calls these in order:

    resolve_run(cfg, sources, world)   the final config, from files alone, before any Accelerator, process group,
                                       model or data exists: init_from=auto decided, a resumed run's saved config
                                       plus this command's keys (printed as changes), the accumulation for this
                                       number of processes, Muon's dtype, the data and the checkpoint checked
    build_model(cfg, ckpt, state, log) the tokenizer and the model (scratch, the checkpoint, gpt2*, a folder, a hub id)
    restore_training_state(...)        the optimizer state, this rank's RNG streams and data position

A resumed run takes from its checkpoint everything that defines the run (model, data, optimizer, schedule,
accumulation, precision, ...) and from this command only what it gives on its command line, plus the keys no
checkpoint decides (config.COMMAND_KEYS: where it writes, what it publishes, what it trusts).
"""

import dataclasses
import json
import math
import os

import torch

from .checkpoint import CKPT_PREFIX, MANIFEST, load_tree, set_rng_state, verify_checkpoint
from .config import CLI, SHAPE_KEYS, model_options, resumed_config, validate
from .corpus import check_prepared, data_fingerprint, dataset_dir, read_meta
from .data import MemmapBatches, check_bin
from .errors import UserError
from .hardware import native_bf16
from .launch import on_gpu, round_accumulation
from .model_io import from_pretrained_strict, load_model_and_tokenizer, model_config_of
from .optim import load_optimizer_state
from .run_dir import RunDir
from .sources import looks_like_hub_id
from .tokenization import char_tokenizer, check_same_vocabulary, gpt2_hf_tokenizer, meta_signature, tokenizer_signature

__all__ = ["resolve_run", "build_model", "restore_training_state", "data_dir_of", "find_resume_checkpoint"]


# ------------------------------------------------------------------------------------------- the config
def resolve_run(cfg, sources, world):
    """(cfg, checkpoint or None, its trainer_state or None, [lines to print]). Runs on every rank from the same
    files, so every rank resolves the same run (or refuses with the same message)."""
    run, notes = RunDir(cfg.out_dir), []
    run.refuse_if_in_use()  # a second trainer on the folder: its one line before anything else is said
    if cfg.init_from == "auto":  # torchrun --max-restarts: the same command resumes after a crash
        cfg = dataclasses.replace(cfg, init_from="resume" if run.latest_checkpoint() else "scratch")
        if cfg.init_from == "scratch":
            validate(cfg, sources)  # the shape, which load_config leaves to the resolved run
    ckpt = state = None
    if cfg.init_from == "resume":
        ckpt = find_resume_checkpoint(cfg, notes.append)
        state = read_trainer_state(ckpt)
        cfg, sources, changed = resumed_config(state["config"], cfg, sources)
        _check_shape(cfg, state["model_shape"], ckpt)
        notes.append(f"Resuming training from {ckpt}")
        notes += [f"  {key}: {old!r} -> {new!r} ({why})" for key, (old, new, why) in changed.items()]
    elif run.complete_checkpoints():  # a fresh run must not mix with (or later prune) another run's checkpoints
        raise UserError(f"out_dir {cfg.out_dir} already holds checkpoints of a run "
                        f"({os.path.basename(run.latest_checkpoint())}): continue it with init_from=resume "
                        f"(or auto), or choose another out_dir")
    elif cfg.init_from != "scratch":
        cfg = _adopt_model_shape(cfg, model_config_of(cfg.init_from))
    cfg = _resolve_accumulation(cfg, world, state, sources.get("gradient_accumulation_steps") == CLI, notes.append)
    cfg = _resolve_ns_dtype(cfg, on_gpu(cfg), notes.append)
    if cfg.data_source == "memmap":
        _check_data(cfg, ckpt, state, notes.append)
    return cfg, ckpt, state, notes


def _resolve_accumulation(cfg, world, state, explicit, note):
    """gradient_accumulation_steps is the total over all processes, as in nanoGPT. A fresh run (or one whose command
    line sets it) rounds it up to a multiple of the process count; a resumed run keeps its tokens per iteration on
    any number of processes that divides its total, and refuses one that does not."""
    total = cfg.gradient_accumulation_steps
    tokens = lambda n: f"{n * cfg.batch_size * cfg.block_size:,} tokens per iteration"  # noqa: E731
    if state is None or explicit:
        rounded = round_accumulation(total, world)
        if rounded != total:
            note(f"warning: gradient_accumulation_steps={total} is not a multiple of the {world} processes: using "
                 f"{rounded} ({tokens(rounded)})")
        return dataclasses.replace(cfg, gradient_accumulation_steps=rounded)
    if total % world:
        raise UserError(f"this run does {total} micro-steps per iteration in all, which {world} processes cannot share: "
                        f"resume it on a number of processes that divides {total}, or pass "
                        f"--gradient_accumulation_steps={round_accumulation(total, world)} to change its "
                        f"{tokens(total)}")
    if state.get("world_size", world) != world:
        note(f"the run was on {state['world_size']} process(es), now {world}: {total // world} micro-steps per "
             f"process keep its {tokens(total)}")
    return cfg


def _resolve_ns_dtype(cfg, gpu, note):
    """muon_ns_dtype=auto becomes bfloat16 where the device computes bf16 natively, else float32; decided once and
    saved with the run (a resume keeps it, so it stays bit-exact)."""
    if cfg.optimizer != "muon" or cfg.muon_ns_dtype != "auto":
        return cfg
    device = "cuda" if gpu else "cpu"
    dtype = "bfloat16" if native_bf16(device) else "float32"
    note(f"Muon's Newton-Schulz runs in {dtype} ({'native' if dtype == 'bfloat16' else 'no native'} bf16 on this "
         f"{device.upper()}; muon_ns_dtype=auto)")
    return dataclasses.replace(cfg, muon_ns_dtype=dtype)


def _adopt_model_shape(cfg, model_config):
    """A finetune's shape is its model's (like nanoGPT), and the saved config says so. block_size may be smaller
    than the model's context (the model is cropped), never larger."""
    if cfg.block_size > model_config.block_size:
        raise UserError(f"block_size={cfg.block_size} is larger than {cfg.init_from}'s context of "
                        f"{model_config.block_size}; use block_size <= {model_config.block_size}")
    shape = {k: getattr(model_config, k) for k in SHAPE_KEYS if k not in ("vocab_size", "block_size")}
    shape["logit_softcap"] = shape["logit_softcap"] or 0.0  # the model's None is the training key's 0
    return dataclasses.replace(cfg, **shape)


def _check_shape(cfg, ckpt_shape, where):
    mine = model_options(cfg)
    for key in SHAPE_KEYS:
        # keys a checkpoint does not record (written before they existed) cannot disagree
        if key != "vocab_size" and key in ckpt_shape and mine[key] != ckpt_shape[key]:
            raise UserError(f"{where} was trained with {key}={ckpt_shape[key]!r} but the command line says "
                            f"{mine[key]!r}: resume with the run's own shape, or use another out_dir")


# ------------------------------------------------------------------------------------------- checkpoint
def find_resume_checkpoint(cfg, note):
    """The newest complete checkpoint of resume_from (a checkpoint, an out_dir, a hub id) or of out_dir. A damaged
    newest one is refused naming the older complete one; one that recorded a non-finite loss (written by a version
    that kept diverged states) is passed over for the newest good one."""
    source = cfg.resume_from or cfg.out_dir
    if source and not os.path.exists(source) and looks_like_hub_id(source):
        from .hub import download_training_state

        source = download_training_state(source)
    if os.path.exists(os.path.join(source, MANIFEST)) or os.path.basename(source).startswith(CKPT_PREFIX):
        return verify_checkpoint(source)
    candidates = [c for c in RunDir(source).complete_checkpoints() if not _diverged(c, note)]
    if not candidates:
        raise UserError(f"init_from=resume: no complete checkpoint in {os.path.join(source, 'checkpoints')}; "
                        f"train with init_from=scratch first (or set resume_from)")
    try:
        return verify_checkpoint(candidates[-1])
    except UserError as e:
        older = f"; the older complete one is {candidates[-2]}: --resume_from={candidates[-2]}" if len(candidates) > 1 else ""
        raise UserError(f"{e}{older}") from e


def _diverged(ckpt, note):
    try:
        with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
            loss = json.load(f).get("val_loss")
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: verify_checkpoint says why, if it is the one picked
    if isinstance(loss, (int, float)) and not math.isfinite(loss):
        note(f"warning: {ckpt} recorded val loss {loss}: a diverged state, passed over")
        return True
    return False


def _count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# what each trainer_state.json value must be (a crafted or damaged file is refused before anything reads it)
_STATE_FIELDS = {
    "iter_num": (_count, "a whole number >= 0"),
    "best_val_loss": (_number, "a number"),
    "val_loss": (lambda v: v is None or _number(v), "a number or null"),
    "train_loss": (lambda v: v is None or _number(v), "a number or null"),
    "eval_iter": (lambda v: v is None or _count(v), "a whole number >= 0 or null"),
    "best_checkpoint": (lambda v: v is None or isinstance(v, str), "a checkpoint's name or null"),
    "world_size": (lambda v: _count(v) and v > 0, "a whole number >= 1"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "model_shape": (lambda v: isinstance(v, dict), "an object"),
    "tokenizer": (lambda v: isinstance(v, dict), "an object"),
    "data": (lambda v: isinstance(v, dict), "an object"),
    "tracker_ids": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()), "an object of ids"),
}
_REQUIRED = ("iter_num", "config", "model_shape", "tokenizer")


def read_trainer_state(ckpt):
    """The checkpoint's trainer_state.json with every value checked; best_checkpoint as a checkpoint's folder name
    (records written before runs were relocatable hold a path: its last part is the name, in this out_dir)."""
    where = f"{ckpt}/trainer_state.json"
    try:
        with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{where} is unreadable ({e}); resume from another checkpoint") from e
    if not isinstance(state, dict):
        raise UserError(f"{where} holds no object; resume from another checkpoint")
    for key in _REQUIRED:
        if key not in state:
            raise UserError(f"{where} has no {key}; resume from another checkpoint")
    for key, (ok, what) in _STATE_FIELDS.items():
        if key in state and not ok(state[key]):
            raise UserError(f"{where}: {key} is {state[key]!r}, not {what} (damaged or crafted); resume from another "
                            f"checkpoint")
    best = state.get("best_checkpoint")
    if best is not None:
        name = os.path.basename(best.rstrip("/\\"))
        if not name.startswith(CKPT_PREFIX) or not name[len(CKPT_PREFIX):].isdigit():
            raise UserError(f"{where}: best_checkpoint {best!r} names no checkpoint (damaged or crafted); resume from "
                            f"another checkpoint")
        state["best_checkpoint"] = name
    return state


# ------------------------------------------------------------------------------------------- data
def data_dir_of(cfg):
    return cfg.data_dir or dataset_dir(cfg.dataset)


def _check_data(cfg, ckpt, state, note):
    """The prepared bins against meta.json (sizes, vocabulary, content fingerprint), long enough for block_size,
    made with the checkpoint's vocabulary, and (on resume) unchanged since the checkpoint."""
    data_dir = data_dir_of(cfg)
    meta = check_prepared(data_dir, cfg.allow_data_change, note)
    for split in ("train", "val"):
        check_bin(data_dir, split, cfg.block_size)
    if ckpt is None:
        return
    check_same_vocabulary(state["tokenizer"], meta_signature(meta), ckpt)  # the clearer message first
    recorded, now = state.get("data") or {}, data_fingerprint(data_dir)
    changed = [k for k in recorded if now.get(k) != recorded[k]]
    if not changed:
        return
    what = ", ".join(changed)
    if not cfg.allow_data_change:
        raise UserError(f"the data in {data_dir} changed since {ckpt} was written ({what}): resume on the data the run "
                        f"started with, or pass --allow_data_change=true")
    note(f"warning: the data changed since {ckpt} ({what}); continuing (allow_data_change=true)")


def data_tokenizer(cfg):
    """The training data's tokenizer: nanoGPT's char vocabulary from meta.json, or GPT-2 BPE."""
    if cfg.data_source == "streaming":
        return gpt2_hf_tokenizer(cfg.block_size)
    data_dir = data_dir_of(cfg)
    meta = read_meta(data_dir)  # the bins were checked against it in resolve_run
    if meta.get("tokenizer") == "char":
        try:
            chars = meta_signature(meta)["vocab"]
        except (KeyError, TypeError) as e:
            raise UserError(f"{data_dir}/meta.json: its char vocabulary is incomplete ({e}); run prepare.py again") from e
        return char_tokenizer(list(chars), model_max_length=cfg.block_size)
    if meta.get("tokenizer") == "gpt2":
        return gpt2_hf_tokenizer(cfg.block_size)
    raise UserError(f"{data_dir}/meta.json: unknown tokenizer {meta.get('tokenizer')!r}; run prepare.py again")


# ------------------------------------------------------------------------------------------- model
def _vocab_size_for(tokenizer):
    # GPT-2's 50257 rounded up to 50304 (a multiple of 64) like nanoGPT; char: the characters + <pad> + end of text
    return 50304 if tokenizer_signature(tokenizer)["kind"] == "gpt2" else len(tokenizer)


def build_model(cfg, ckpt, state, log):
    """(tokenizer, model) for the resolved run: the checkpoint's model, a new one, or init_from's (gpt2*, a model
    folder, a hub id; its tokenizer must be the data's)."""
    from .configuration_nanogpt import NanoGPTConfig
    from .modeling_nanogpt import NanoGPTForCausalLM

    tokenizer = data_tokenizer(cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights whatever the number of processes
    if ckpt is not None:
        check_same_vocabulary(state["tokenizer"], tokenizer_signature(tokenizer), ckpt)
        model = from_pretrained_strict(os.path.join(ckpt, "model"), dropout=cfg.dropout)
    elif cfg.init_from == "scratch":
        log("Initializing a new model from scratch")
        config = NanoGPTConfig(vocab_size=_vocab_size_for(tokenizer), **model_options(cfg),
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.eos_token_id)
        model = NanoGPTForCausalLM(config)
    else:
        log(f"Initializing from {cfg.init_from}")
        model, model_tokenizer = load_model_and_tokenizer(cfg.init_from, trust_remote_code=cfg.trust_remote_code,
                                                          dropout=cfg.dropout)
        check_same_vocabulary(tokenizer_signature(model_tokenizer), tokenizer_signature(tokenizer), cfg.init_from)
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)  # model surgery to decrease the block size if necessary
    if cfg.gradient_checkpointing:
        from .model_io import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    return tokenizer, model


# ------------------------------------------------------------------------------------------- training state
def restore_training_state(ckpt, raw_model, optimizers, train_source, rank, log):
    """The optimizer state (sharded like the parameters: under FSDP each rank reads its own rows of each tensor,
    not the file), this rank's RNG streams and data position."""
    stem = os.path.join(ckpt, "optimizer")
    read = load_optimizer_state(raw_model, optimizers, load_tree(stem, lazy=True), ckpt)
    log(f"optimizer state: read {read / 2**20:.3g} MiB of {os.path.getsize(stem + '.safetensors') / 2**20:.3g} MiB "
        f"on rank {rank}")
    rank_file = os.path.join(ckpt, f"rank{rank}")
    if not os.path.exists(rank_file + ".json"):
        if not isinstance(train_source, MemmapBatches):
            log(f"warning: {ckpt} was saved with fewer processes: rank {rank} starts a fresh stream position")
            return
        # the memmap sampler's generator is the same on every rank (each draws all ranks' windows): rank 0's position
        # is every rank's; only this rank's dropout RNG starts afresh
        train_source.load_state_dict(load_tree(os.path.join(ckpt, "rank0"))["data"])
        return
    saved = load_tree(rank_file)
    set_rng_state(saved["rng"])
    try:
        train_source.load_state_dict(saved["data"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{ckpt}: its data position does not fit data_source={type(train_source).__name__} ({e})") from e
