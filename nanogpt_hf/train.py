"""The training loop behind train_accelerate.py: one Accelerate loop for CPU, one GPU, DDP and multi-node.

It follows nanoGPT's train.py step for step (evaluate every eval_interval, checkpoint, accumulate, clip, step,
log), with Accelerate doing device placement, process groups, mixed precision and gradient accumulation.
The pieces around the loop live beside it: config.py (the typed config), launch.py (processes, signals),
run_dir.py (out_dir), tracking.py (progress, journal, trackers), checkpoint.py (the checkpoint format).
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError

from .checkpoint import (
    CKPT_PREFIX,
    fault_point,
    load_optimizer_state,
    load_tree,
    optimizer_state,
    prune_checkpoints,
    rng_state,
    save_tree,
    set_rng_state,
    verify_checkpoint,
    write_manifest,
)
from .config import MODEL_KEYS, load_config, model_options, resumed_config
from .corpus import check_prepared, data_fingerprint, dataset_dir
from .data import MemmapBatches, StreamingBatches
from .errors import UserError, cli_main
from .hardware import peak_flops
from .launch import StopSignals, finish, make_accelerator, together
from .model_io import enable_activation_checkpointing, from_pretrained_strict, load_model_and_tokenizer, looks_like_hub_id
from .run_dir import RunDir
from .tokenization import char_tokenizer, check_same_vocabulary, gpt2_hf_tokenizer, meta_signature, tokenizer_signature
from .tracking import Journal, Progress, init_trackers

__all__ = ["main", "train", "get_lr", "TrainState"]

# what a resumed run cannot change: the model keys but dropout and zero_init_residual (they do not change what the
# weights mean), and the vocabulary
SHAPE_KEYS = tuple(k for k in MODEL_KEYS if k not in ("dropout", "zero_init_residual")) + ("vocab_size",)


@dataclass
class TrainState:
    """What a checkpoint restores besides weights, optimizer, RNG streams and the data position."""

    iter_num: int = 0
    best_val_loss: float = 1e9
    best_checkpoint: str | None = None  # the checkpoint folder with best_val_loss
    val_loss: float | None = None  # of the latest evaluation
    train_loss: float | None = None  # of the latest evaluation
    eval_iter: int | None = None  # iteration of the latest evaluation
    tracker_ids: dict = field(default_factory=dict)  # W&B run id: a resumed run continues the same W&B run
    data: dict = field(default_factory=dict)  # the data's fingerprint (corpus.data_fingerprint): resume notices a change


# ------------------------------------------------------------------------------------------- schedule
def get_lr(it, cfg):
    """nanoGPT's learning rate decay scheduler (cosine with linear warmup, floor at min_lr), or warmup-stable-decay
    (lr_schedule=wsd: the peak until the last cooldown_frac of lr_decay_iters, then linear to min_lr; Hägele et al.
    2024, the speedrun's schedule). AdamW's rate; Muon's is scaled alongside (see _set_lr)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    # 1) linear warmup for warmup_iters steps
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        # 3) stable at the peak, then linear decay to min_lr over the last cooldown_frac of the iterations
        cooldown_start = max(cfg.warmup_iters, cfg.lr_decay_iters * (1 - cfg.cooldown_frac))
        if it < cooldown_start:
            return cfg.learning_rate
        coeff = (cfg.lr_decay_iters - it) / max(1, cfg.lr_decay_iters - cooldown_start)  # 1..0
        return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def _set_lr(optimizers, lr):
    """Every group at the schedule's rate times its lr_scale (Muon's groups: muon_lr / learning_rate)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


# ------------------------------------------------------------------------------------------- data
def data_dir_of(cfg):
    return cfg.data_dir or dataset_dir(cfg.dataset)


def data_tokenizer(cfg):
    """The training data's tokenizer: nanoGPT's char vocabulary from meta.json, or GPT-2 BPE."""
    if cfg.data_source == "streaming":
        return gpt2_hf_tokenizer(cfg.block_size)
    data_dir = data_dir_of(cfg)
    meta = check_prepared(data_dir)
    if meta.get("tokenizer") == "char":
        try:
            chars = meta_signature(meta)["vocab"]
        except (KeyError, TypeError) as e:
            raise UserError(f"{data_dir}/meta.json: its char vocabulary is incomplete ({e}); run prepare.py again") from e
        return char_tokenizer(list(chars), model_max_length=cfg.block_size)
    if meta.get("tokenizer") == "gpt2":
        return gpt2_hf_tokenizer(cfg.block_size)
    raise UserError(f"{data_dir}/meta.json: unknown tokenizer {meta.get('tokenizer')!r}; run prepare.py again")


def _streaming_source(cfg, accelerator, files, split, log):
    return StreamingBatches(cfg.block_size, cfg.batch_size, dataset=cfg.stream_dataset or None, files=files or None,
                            split=split, text_column=cfg.stream_text_column, rank=accelerator.process_index,
                            world_size=accelerator.num_processes, log=log)


def make_train_source(cfg, accelerator, log):
    if cfg.data_source == "streaming":
        return _streaming_source(cfg, accelerator, cfg.stream_files, cfg.stream_split, log)
    return MemmapBatches(data_dir_of(cfg), "train", cfg.block_size, cfg.batch_size, cfg.seed,
                         accelerator.process_index, accelerator.num_processes)


def make_eval_source(cfg, accelerator, split, iter_num):
    """A fresh source per evaluation: deterministic (no training state to save), different at each eval."""
    if cfg.data_source == "streaming":
        files = cfg.stream_val_files if split == "val" else cfg.stream_files
        stream_split = cfg.stream_split if split == "train" or cfg.stream_val_files else cfg.stream_val_split
        return _streaming_source(cfg, accelerator, files, "train" if files else stream_split, lambda m: None)
    seed = cfg.seed * 1_000_003 + iter_num * 2 + (split == "val")
    return MemmapBatches(data_dir_of(cfg), split, cfg.block_size, cfg.batch_size, seed,
                         accelerator.process_index, accelerator.num_processes)


@torch.no_grad()
def estimate_loss(model, cfg, accelerator, iter_num):
    """Mean loss over exactly eval_iters batches per split, shared out across the ranks: each draw gives every
    rank its share of the batches one process would see, and the surplus of the last draw is skipped."""
    out = {}
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    for split in ("train", "val"):
        fault_point("eval")
        source = make_eval_source(cfg, accelerator, split, iter_num)
        total = torch.zeros(2, device=accelerator.device)  # (sum of batch losses, batches)
        for k in range(math.ceil(cfg.eval_iters / world)):
            x, y = (t.to(accelerator.device) for t in source.next_batch())  # every rank draws: sources stay in step
            if k * world + rank < cfg.eval_iters:
                with accelerator.autocast():
                    total[0] += model(x, shift_labels=y, use_cache=False).loss.float()
                total[1] += 1
        total = accelerator.reduce(total, reduction="sum")
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


# ------------------------------------------------------------------------------------------- model
def find_resume_checkpoint(cfg):
    """The newest complete checkpoint of resume_from (a checkpoint, an out_dir, a hub id) or of out_dir. A damaged
    newest one is refused naming the older complete one to use instead."""
    source = cfg.resume_from or cfg.out_dir
    if source and not os.path.exists(source) and looks_like_hub_id(source):
        from .hub import download_training_state

        source = download_training_state(source)
    if os.path.exists(os.path.join(source, "MANIFEST.json")) or os.path.basename(source).startswith(CKPT_PREFIX):
        return verify_checkpoint(source)
    candidates = RunDir(source).complete_checkpoints()
    if not candidates:
        raise UserError(f"init_from=resume: no complete checkpoint in {os.path.join(source, 'checkpoints')}; "
                        f"train with init_from=scratch first (or set resume_from)")
    try:
        return verify_checkpoint(candidates[-1])
    except UserError as e:
        older = f"; the older complete one is {candidates[-2]}: --resume_from={candidates[-2]}" if len(candidates) > 1 else ""
        raise UserError(f"{e}{older}") from e


def read_trainer_state(ckpt):
    try:
        with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt}/trainer_state.json is unreadable ({e}); resume from another checkpoint") from e


def _vocab_size_for(tokenizer):
    # GPT-2's 50257 rounded up to 50304 (a multiple of 64) like nanoGPT; char: the characters + <pad> + end of text
    return 50304 if tokenizer_signature(tokenizer)["kind"] == "gpt2" else len(tokenizer)


def build_model(cfg, tokenizer, log, ckpt=None, ckpt_state=None):
    """The model for init_from: scratch, a checkpoint being resumed, gpt2*, a model folder or a hub id."""
    from .configuration_nanogpt import NanoGPTConfig
    from .modeling_nanogpt import NanoGPTForCausalLM

    data_sig = tokenizer_signature(tokenizer)
    if ckpt is not None:
        check_same_vocabulary(ckpt_state["tokenizer"], data_sig, ckpt)
        return from_pretrained_strict(os.path.join(ckpt, "model"), dropout=cfg.dropout)
    if cfg.init_from == "scratch":
        log("Initializing a new model from scratch")
        config = NanoGPTConfig(vocab_size=_vocab_size_for(tokenizer), **model_options(cfg),
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.eos_token_id)
        return NanoGPTForCausalLM(config)
    log(f"Initializing from {cfg.init_from}")
    model, model_tokenizer = load_model_and_tokenizer(cfg.init_from, dropout=cfg.dropout)
    check_same_vocabulary(tokenizer_signature(model_tokenizer), data_sig, cfg.init_from)
    if cfg.block_size > model.config.block_size:
        raise UserError(f"block_size={cfg.block_size} is larger than {cfg.init_from}'s context of "
                        f"{model.config.block_size}; use block_size <= {model.config.block_size}")
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)  # model surgery to decrease the block size if necessary
    return model


def adopt_model_shape(cfg, model):
    """The loaded model's shape wins over the config's, like nanoGPT (and the saved config says so)."""
    shape = {k: getattr(model.config, k) for k in SHAPE_KEYS if k not in ("vocab_size", "block_size")}
    shape["logit_softcap"] = shape["logit_softcap"] or 0.0  # the model's None is the training key's 0
    return dataclasses.replace(cfg, **shape)


def _check_shape(cfg, ckpt_shape, where):
    mine = model_options(cfg)
    for key in SHAPE_KEYS:
        # keys a checkpoint does not record (written before they existed) cannot disagree
        if key != "vocab_size" and key in ckpt_shape and mine[key] != ckpt_shape[key]:
            raise UserError(f"{where} was trained with {key}={ckpt_shape[key]!r} but the command line says "
                            f"{mine[key]!r}: resume with the run's own shape, or use another out_dir")


def _check_same_data(cfg, ckpt, recorded, log):
    if not recorded:  # a checkpoint from before fingerprints
        return
    now = data_fingerprint(data_dir_of(cfg))
    if now != recorded:
        what = ", ".join(k for k in now if now[k] != recorded.get(k))
        if not cfg.allow_data_change:
            raise UserError(f"the data in {data_dir_of(cfg)} changed since {ckpt} was written ({what}): resume on the "
                            f"data the run started with, or pass --allow_data_change=true")
        log(f"warning: the data changed since {ckpt} ({what}); continuing (allow_data_change=true)")


def configure_optimizer(model, cfg):
    """nanoGPT's AdamW: weight decay on every 2D+ tensor (matmuls, embeddings), none on biases and LayerNorms.
    optimizer=muon: the blocks' 2-D weights go to torch.optim.Muon (Jordan et al. 2024) instead, at muon_lr; the
    embeddings, the head, gains and biases stay with AdamW (as in modded-nanogpt). Returns ([optimizers], fused)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # shared (tied) tensors appear once
    to_muon = [cfg.optimizer == "muon" and p.dim() == 2 and ".h." in f".{n}" for n, p in named]
    muon = [p for (_, p), m in zip(named, to_muon) if m]
    decay = [p for (_, p), m in zip(named, to_muon) if p.dim() >= 2 and not m]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    try:  # the fused kernel is faster, on CUDA and (torch >= 2.4) on CPU
        adamw, fused = torch.optim.AdamW(groups, fused=True, **kwargs), True
    except (RuntimeError, TypeError, ValueError):
        adamw, fused = torch.optim.AdamW(groups, **kwargs), False
    if not muon:
        return [adamw], fused
    scale = cfg.muon_lr / cfg.learning_rate if cfg.learning_rate else 0.0
    return [adamw, torch.optim.Muon([{"params": muon, "lr_scale": scale}], lr=cfg.muon_lr,
                                    weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)], fused


def maybe_compile(model, cfg, log):
    if not cfg.compile:
        return model
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            raise RuntimeError("torch.compile is not supported on this Python/platform")
        torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly, with a warning
        log("compiling the model... (takes a ~minute)")
        return torch.compile(model)
    except Exception as e:  # any failure here: warn and train eagerly
        log(f"warning: compile=True but torch.compile is unavailable ({e}); training without it")
        return model


# ------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(accelerator, model, optimizers, train_source, tokenizer, cfg, run, state, tokens_per_iter):
    """Writes checkpoints/ckpt-N atomically (see checkpoint.py), then makes out_dir's model folder equal to it.
    Returns the checkpoint path, or None when the weights are not finite (such a checkpoint is never written).
    A full disk or a permission error is one UserError on every rank; the previous checkpoint stays intact."""
    unwrapped = accelerator.unwrap_model(model)
    finite = torch.tensor(float(all(torch.isfinite(_local(p)).all() for p in unwrapped.parameters())), device=accelerator.device)
    if accelerator.reduce(finite, reduction="sum").item() < accelerator.num_processes:
        return None
    final = run.checkpoint_path(state.iter_num)
    tmp = os.path.join(run.checkpoints, f".tmp-{os.path.basename(final)}")

    def writing(step):  # a failed write: the temporary folder goes, the error is one line on every rank
        try:
            step()
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = getattr(e, "strerror", None) or str(e)
            previous = run.latest_checkpoint()
            raise UserError(f"cannot write checkpoint {final} ({reason}); "
                            f"{'the previous one, ' + previous + ', is intact' if previous else 'nothing was saved'}: "
                            f"free disk space or fix permissions, then continue with init_from=auto") from e

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
        unwrapped.save_pretrained(os.path.join(tmp, "model"), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(tmp, "model"))
        fault_point("checkpoint")  # half-written: weights there, optimizer and manifest not yet
        save_tree(os.path.join(tmp, "optimizer"), optimizer_whole)
        record = dict(dataclasses.asdict(state), tokens_seen=state.iter_num * tokens_per_iter,
                      world_size=accelerator.num_processes, config=cfg.to_dict(),
                      tokenizer=tokenizer_signature(tokenizer), model_shape=_shape_of(unwrapped.config))
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        fault_point("checkpoint_manifest")  # every file written, no manifest yet
        write_manifest(tmp)
        if os.path.isdir(final):  # the same iteration saved again by a rerun from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        fault_point("publish")  # renamed, the model folder not yet refreshed: repaired at the next start
        prune_checkpoints(run.checkpoints, cfg.keep_last, state.best_checkpoint)
        run.publish_model(final)

    together(accelerator, lambda: writing(begin))
    together(accelerator, lambda: writing(rank_state))
    state_dict = accelerator.get_state_dict(model)  # collectives under FSDP: every rank calls them
    optimizer_whole = optimizer_state(unwrapped, optimizers, keep=accelerator.is_main_process)
    together(accelerator, lambda: writing(main_part))
    return final


def _local(tensor):
    """This rank's part of a parameter (FSDP2 shards are DTensors)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _shape_of(model_config):
    return {k: getattr(model_config, k) for k in SHAPE_KEYS}


def restore_training_state(ckpt, accelerator, model, optimizers, train_source, log):
    load_optimizer_state(accelerator.unwrap_model(model), optimizers, load_tree(os.path.join(ckpt, "optimizer")), ckpt)
    rank_file = os.path.join(ckpt, f"rank{accelerator.process_index}")
    if not os.path.exists(rank_file + ".json"):
        if not isinstance(train_source, MemmapBatches):
            log(f"warning: {ckpt} was saved with fewer processes: rank {accelerator.process_index} starts a fresh "
                f"stream position")
            return
        # the memmap sampler's generator is the same on every rank (each draws all ranks' windows): rank 0's position
        # is every rank's; only this rank's dropout RNG starts afresh
        saved = load_tree(os.path.join(ckpt, "rank0"))
        train_source.load_state_dict(saved["data"])
        return
    saved = load_tree(rank_file)
    set_rng_state(saved["rng"])
    try:
        train_source.load_state_dict(saved["data"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{ckpt}: its data position does not fit data_source={type(train_source).__name__} ({e})") from e


# ------------------------------------------------------------------------------------------- set-up
def resolve_run(cfg, sources, run, log):
    """(cfg, checkpoint or None, its trainer_state or None): init_from=auto picks resume or scratch; a resumed run
    keeps its own config, changed only by the keys on this command line (printed)."""
    if cfg.init_from == "auto":  # torchrun --max-restarts: the same command resumes after a crash
        cfg = dataclasses.replace(cfg, init_from="resume" if run.latest_checkpoint() else "scratch")
    if cfg.init_from != "resume":
        if run.complete_checkpoints():  # a fresh run must not mix with (or later prune) another run's checkpoints
            raise UserError(f"out_dir {cfg.out_dir} already holds checkpoints of a run "
                            f"({os.path.basename(run.latest_checkpoint())}): continue it with init_from=resume "
                            f"(or auto), or choose another out_dir")
        return cfg, None, None
    ckpt = find_resume_checkpoint(cfg)
    state = read_trainer_state(ckpt)
    cfg, sources, changed = resumed_config(state["config"], cfg, sources)
    _check_shape(cfg, state["model_shape"], ckpt)
    log(f"Resuming training from {ckpt}")
    for key, (old, new) in changed.items():
        log(f"  {key}: {old!r} -> {new!r} (from the command line)")
    return cfg, ckpt, state


def _setup(cfg, sources, run, log):
    """Everything that can refuse the run, before anything in out_dir is written (run on every rank)."""
    cfg, ckpt, ckpt_state = resolve_run(cfg, sources, run, log)
    tokenizer = data_tokenizer(cfg)
    torch.manual_seed(cfg.seed)  # the same initial weights whatever the number of processes
    model = build_model(cfg, tokenizer, log, ckpt, ckpt_state)  # refuses another tokenizer's data first
    if ckpt is not None and cfg.data_source == "memmap":
        _check_same_data(cfg, ckpt, ckpt_state.get("data") or {}, log)
    if ckpt is None and cfg.init_from != "scratch":
        cfg = adopt_model_shape(cfg, model)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return cfg, ckpt, ckpt_state, tokenizer, model


# ------------------------------------------------------------------------------------------- the loop
def train(cfg, sources=None):
    sources = sources or {}
    run = RunDir(cfg.out_dir)
    trackers = sorted(set(cfg.loggers) | ({"wandb"} if cfg.wandb_log else set()))
    accelerator, cfg, launch_warnings = make_accelerator(cfg, trackers)
    main = accelerator.is_main_process
    log = accelerator.print
    for w in launch_warnings:
        log(f"warning: {w}")

    # everything that can refuse the run, read-only, on every rank; then out_dir is taken: its lock, a clean and
    # writable folder (the main process alone touches out_dir)
    cfg, ckpt, ckpt_state, tokenizer, model = together(accelerator, lambda: _setup(cfg, sources, run, log))

    def own_out_dir():
        if main:
            run.acquire()
            run.probe_writable()
            # a checkpoint holds the weights, AdamW's two moments and a copy for the model folder (fp32)
            need = 4 * 4 * sum(p.numel() for p in model.parameters())
            if run.free_bytes() < 2 * need:
                log(f"warning: {run.free_bytes() / 1e6:.0f} MB free in {cfg.out_dir}, a checkpoint needs about "
                    f"{need / 1e6:.0f} MB: saves may fail (the run would stop with the previous checkpoint intact)")
            for name in run.clean_leftovers():
                log(f"removed {name}, left by an interrupted write")
            run.repair_model(log)

    together(accelerator, own_out_dir)
    torch.manual_seed(cfg.seed + accelerator.process_index)  # dropout differs per rank, like nanoGPT

    world = accelerator.num_processes
    gas = cfg.gradient_accumulation_steps // world
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    optimizers, fused = configure_optimizer(model, cfg)
    if len(optimizers) > 1 and accelerator.mixed_precision == "fp16":
        raise UserError("optimizer=muon does not work with float16's gradient scaler: use dtype=bfloat16 or float32")
    model = maybe_compile(model, cfg, log)
    model, *optimizers = accelerator.prepare(model, *optimizers)
    # the main process first: a streamed dataset is downloaded and cached once for all ranks
    train_source = together(accelerator, lambda: make_train_source(cfg, accelerator, log), main_first=True)
    state = TrainState(data=data_fingerprint(data_dir_of(cfg)) if cfg.data_source == "memmap" else {})
    if ckpt:
        restore_training_state(ckpt, accelerator, model, optimizers, train_source, log)
        known = {f.name for f in dataclasses.fields(TrainState)}
        state = TrainState(**{**{k: v for k, v in ckpt_state.items() if k in known}, "data": state.data})
    resume_iter = state.iter_num if ckpt else None
    state.tracker_ids = together(accelerator, lambda: init_trackers(accelerator, cfg, state.tracker_ids))
    if main and not cfg.eval_only:  # the run is known to start: now out_dir is written
        run.rewind_log(resume_iter, log)
        run.write_config(cfg.to_dict())
    journal = Journal(accelerator, run)

    raw_model = accelerator.unwrap_model(model)
    n_params = raw_model.get_num_params()
    peak = peak_flops(accelerator.device, dtype={"bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32))
    flops_per_iter = raw_model.flops_per_token(cfg.block_size) * tokens_per_iter / world  # per process (MFU per device)
    log(f"world size {world} ({accelerator.distributed_type.value}) | tokens per iteration will be: {tokens_per_iter:,} "
        f"({cfg.gradient_accumulation_steps} accumulation x {cfg.batch_size} batch x {cfg.block_size} block; "
        f"{gas} micro-steps per process)")
    log(f"number of parameters: {n_params / 1e6:.2f}M | device {accelerator.device} | precision "
        f"{accelerator.mixed_precision} | {'Muon + ' if len(optimizers) > 1 else ''}fused AdamW {fused} | "
        f"compile {cfg.compile} | data {cfg.data_source}")

    progress = Progress(cfg.max_iters, min(state.iter_num, cfg.max_iters), enabled=accelerator.is_local_main_process)
    say = progress.write  # every message from here on: never on the progress bar's line
    signals = StopSignals()

    def evaluate_and_save(lr, final):
        losses = estimate_loss(model, cfg, accelerator, state.iter_num)
        state.val_loss, state.train_loss, state.eval_iter = losses["val"], losses["train"], state.iter_num
        say(f"step {state.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        journal.log({"iter": state.iter_num, "train/loss_eval": losses["train"], "val/loss": losses["val"],
                     "val/perplexity": math.exp(min(losses["val"], 50)), "lr": lr})
        is_best = losses["val"] < state.best_val_loss
        if (is_best or cfg.always_save_checkpoint or final) and state.iter_num > 0:
            if is_best:
                state.best_val_loss = losses["val"]
                state.best_checkpoint = run.checkpoint_path(state.iter_num)
            checkpoint(final)
        elif is_best:
            state.best_val_loss = losses["val"]

    def checkpoint(final):
        name = run.checkpoint_path(state.iter_num)
        say(f"saving checkpoint to {name}")
        if save_checkpoint(accelerator, model, optimizers, train_source, tokenizer, cfg, run, state, tokens_per_iter):
            _maybe_push(cfg, accelerator, "end" if final else "every_save", say)
        else:
            say("warning: weights are not finite: checkpoint NOT written")

    bad_steps, running_mfu = 0, -1.0
    model.train()
    t0 = time.perf_counter()
    try:
        if cfg.eval_only:  # one evaluation of the model as it is, then exit (nothing saved)
            losses = estimate_loss(model, cfg, accelerator, state.iter_num)
            say(f"step {state.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            return {"iter_num": state.iter_num, "val_loss": losses["val"], "train_loss": losses["train"]}
        while True:
            lr = get_lr(state.iter_num, cfg)
            _set_lr(optimizers, lr)

            # evaluate the loss on train/val sets and write checkpoints; the last iteration always
            done = state.iter_num >= cfg.max_iters
            if (state.iter_num % cfg.eval_interval == 0 or done) and state.iter_num != resume_iter:
                evaluate_and_save(lr, final=done)
            if done:
                break

            # forward backward update, with optional gradient accumulation to simulate larger batch size
            loss_sum = torch.zeros((), device=accelerator.device)
            for _ in range(gas):
                fault_point("step")
                x, y = (t.to(accelerator.device, non_blocking=True) for t in train_source.next_batch())
                with accelerator.accumulate(model), accelerator.autocast():
                    loss = model(x, shift_labels=y, use_cache=False).loss
                    accelerator.backward(loss)  # divided by the per-process accumulation inside
                loss_sum += loss.detach().float()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            step_loss = loss_sum / gas
            finite, stop = _agree(accelerator, step_loss, grad_norm, signals.received)
            if finite or accelerator.scaler is not None:
                for optimizer in optimizers:
                    optimizer.step()  # with fp16 the scaler skips overflowing steps itself
                bad_steps = 0
            else:
                bad_steps += 1
                say(f"warning: non-finite loss or gradient at iter {state.iter_num}: step skipped ({bad_steps} in a row)")
                if bad_steps >= cfg.max_bad_steps:
                    raise UserError(f"{bad_steps} non-finite steps in a row at iter {state.iter_num}: training diverged; "
                                    f"lower learning_rate, raise warmup_iters or enable grad_clip, then resume from the "
                                    f"last checkpoint")
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)

            t1 = time.perf_counter()
            dt, t0 = t1 - t0, t1
            state.iter_num += 1
            progress.step()
            if (state.iter_num - 1) % cfg.log_interval == 0:
                lossf = accelerator.reduce(step_loss, reduction="mean").item()
                if state.iter_num - 1 - (resume_iter or 0) >= 5:  # let the training loop settle a bit
                    mfu = flops_per_iter / dt / peak
                    running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
                gn = grad_norm.item() if torch.is_tensor(grad_norm) else float(grad_norm)
                journal.log({"iter": state.iter_num - 1, "train/loss": lossf, "lr": lr, "grad_norm": gn,
                             "time_ms": dt * 1000, "tokens_per_s": tokens_per_iter / dt, "mfu": max(running_mfu, 0.0)})
                progress.report(state.iter_num - 1, lossf, lr, dt, max(running_mfu, 0.0))
            if stop:  # preemption: the step is done; checkpoint it and leave (resume continues bit for bit)
                checkpoint(final=False)
                progress.close()
                log(f"stopped by {signal.Signals(stop).name} at iteration {state.iter_num}: checkpoint written; continue with "
                    f"init_from=resume (or the same command with init_from=auto)")
                raise SystemExit(128 + stop)
        progress.close()
        log(f"done: trained to iteration {state.iter_num}, val loss {state.val_loss:.4f} "
            f"(best {state.best_val_loss:.4f}); {run.summary() if main else ''}")
        return {"iter_num": state.iter_num, "val_loss": state.val_loss, "best_val_loss": state.best_val_loss}
    finally:
        progress.close()
        signals.restore()
        journal.close()
        finish(accelerator)
        run.release()


def _agree(accelerator, loss, grad_norm, stop_signal):
    """One decision for all ranks, in one reduction: a non-finite value on any rank skips the step everywhere; a
    stop signal on any rank stops every rank after this step."""
    gn = grad_norm if torch.is_tensor(grad_norm) else torch.tensor(float(grad_norm))
    bad = (~torch.isfinite(loss)).float() + (~torch.isfinite(gn.to(loss.device).float())).float()
    flags = torch.stack([bad, torch.tensor(float(stop_signal > 0), device=loss.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad_total, stop_total = flags.tolist()
    return bad_total == 0, stop_signal or (15 if stop_total else 0)  # a rank without the signal stops like SIGTERM


def _maybe_push(cfg, accelerator, when, say):
    """Hub push after a save (every_save) or at the end. A failed push leaves the run intact, says so in one line,
    and is tried again at the next save."""
    if not cfg.push_to_hub or not accelerator.is_main_process:
        return
    if when == "every_save" and cfg.hub_strategy != "every_save":
        return
    from .hub import push_run

    try:
        push_run(cfg, include_training_state=cfg.hub_push_training_state)
    except UserError as e:
        say(f"warning: push to {cfg.hub_model_id} failed ({e}); the run is intact and the push is retried at the "
            f"next save")


@cli_main
def main(argv=None):
    cfg, sources = load_config(sys.argv[1:] if argv is None else argv)
    return train(cfg, sources)


if __name__ == "__main__":
    main()
