"""The training loop behind train_accelerate.py: one Accelerate loop for CPU, one GPU, DDP and multi-node.

It follows nanoGPT's train.py step for step (evaluate every eval_interval, checkpoint, accumulate, clip, step,
log), with Accelerate doing device placement, process groups, mixed precision and gradient accumulation.
What runs where is chosen by the launcher (`accelerate launch --config_file accelerate_configs/...`, torchrun,
or plain python), never by this file.
"""

import json
import math
import os
import shutil
import sys
import time

import torch
import yaml
from tqdm.auto import tqdm

from .checkpoint import (
    CKPT_PREFIX,
    checkpoint_dirs,
    fault_point,
    latest_checkpoint,
    load_tree,
    prune_checkpoints,
    rng_state,
    save_tree,
    set_rng_state,
    verify_checkpoint,
    write_manifest,
)
from .config import load_config, public_config
from .data import MemmapBatches, StreamingBatches
from .errors import UserError, cli_main
from .fileio import atomic_path
from .hardware import keep_freed_memory_mapped, peak_flops
from .model_io import load_model_and_tokenizer, save_model_folder
from .prepare import dataset_dir, read_meta
from .tokenization import char_tokenizer, check_same_vocabulary, gpt2_hf_tokenizer, tokenizer_signature

__all__ = ["main", "train", "get_lr"]

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "activation_function", "vocab_size")


# ------------------------------------------------------------------------------------------- schedule
def get_lr(it, cfg):
    """nanoGPT's learning rate decay scheduler (cosine with linear warmup, floor at min_lr)."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    # 1) linear warmup for warmup_iters steps
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if it > cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return cfg["min_lr"] + coeff * (cfg["learning_rate"] - cfg["min_lr"])


# ------------------------------------------------------------------------------------------- set-up
def _precision(cfg, on_gpu, warn):
    """Accelerate's mixed_precision for the dtype key, with a warning and a working fallback where unsupported."""
    dtype = cfg["dtype"]
    if dtype == "auto":
        if not on_gpu:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if dtype == "bfloat16" and on_gpu and not torch.cuda.is_bf16_supported():
        warn("dtype=bfloat16: this GPU does not support bf16; using float16 with a gradient scaler instead")
        return "fp16"
    if dtype == "float16" and not on_gpu:
        warn("dtype=float16 needs a GPU (its gradient scaler is CUDA-only); training in float32 on the CPU instead")
        return "no"
    return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[dtype]


def make_accelerator(cfg):
    from accelerate import Accelerator, PartialState

    on_gpu = cfg["device"] != "cpu" and torch.cuda.is_available()
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda, but no CUDA GPU is visible; use device=auto or device=cpu")
    # cpu=True under a multi-process launcher gives real DDP over gloo (MULTI_CPU), see PLATFORM_NOTES
    _join_elastic_restart(on_gpu)
    try:
        state = PartialState(cpu=not on_gpu)
    except ValueError as e:  # e.g. WORLD_SIZE set by hand without MASTER_ADDR
        raise UserError(f"cannot join the process group: {str(e).splitlines()[0]} (launch with accelerate launch or torchrun)") from e
    world = state.num_processes
    _check_world_size(world)
    gas = cfg["gradient_accumulation_steps"]
    if gas % world:
        raise UserError(f"gradient_accumulation_steps ({gas}) must be divisible by the number of processes ({world}): "
                        f"it is the total over all processes, like nanoGPT's")
    warnings = []
    precision = _precision(cfg, on_gpu, warnings.append)
    trackers = sorted(set(cfg["loggers"]) | ({"wandb"} if cfg["wandb_log"] else set()))
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=precision, gradient_accumulation_steps=gas // world,
                              log_with=trackers or None, project_dir=cfg["out_dir"])
    for w in warnings:
        accelerator.print(f"warning: {w}")
    if not on_gpu:
        keep_freed_memory_mapped()  # no per-step page faults for the step's big temporaries (hardware.py)
    return accelerator


def _join_elastic_restart(on_gpu):
    """After a torchrun --max-restarts restart, the agent's store still holds the keys of the failed attempt and
    the new workers hang connecting to dead peers (seen with gloo, torch 2.13). Join under a per-attempt prefix."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=datetime.timedelta(minutes=5))
    dist.init_process_group("nccl" if on_gpu else "gloo", store=dist.PrefixStore(f"nanogpt/attempt{attempt}/", store),
                            rank=rank, world_size=world)


def _check_world_size(world):
    """Several Accelerate misconfigurations silently start duplicate single-process runs: refuse them."""
    asked = int(os.environ.get("WORLD_SIZE", "1"))
    if asked != world:
        raise UserError(
            f"the launcher started {asked} processes but this one is not part of a process group (world size {world}): "
            f"each would train alone. On CPU use accelerate_configs/cpu_ddp.yaml (or torchrun); on GPUs check the "
            f"accelerate config")


def _data_dir(cfg):
    return cfg["data_dir"] or dataset_dir(cfg["dataset"])


def data_tokenizer(cfg):
    """The training data's tokenizer: the char tokenizer saved with the bins, or GPT-2 BPE."""
    if cfg["data_source"] == "streaming":
        return gpt2_hf_tokenizer(cfg["block_size"])
    data_dir = _data_dir(cfg)
    meta = read_meta(data_dir)
    if meta.get("tokenizer") == "char":
        tok = char_tokenizer([meta["itos"][str(i)] for i in range(meta["vocab_size"])])
    elif meta.get("tokenizer") == "gpt2":
        tok = gpt2_hf_tokenizer(cfg["block_size"])
    else:
        raise UserError(f"{data_dir}/meta.json: unknown tokenizer {meta.get('tokenizer')!r}; run prepare.py again")
    tok.model_max_length = cfg["block_size"]
    return tok


def _vocab_size_for(tokenizer):
    # GPT-2's 50257 rounded up to 50304 (a multiple of 64) like nanoGPT; char: the characters + <pad> + end of text
    return 50304 if tokenizer_signature(tokenizer)["kind"] == "gpt2" else len(tokenizer)


def find_resume_checkpoint(cfg):
    """The newest complete checkpoint of resume_from (a checkpoint, an out_dir, a hub id) or of out_dir."""
    source = cfg["resume_from"] or cfg["out_dir"]
    if source and not os.path.exists(source) and "/" in source and not source.startswith((".", "/")):
        from .hub import download_training_state

        source = download_training_state(source)
    if os.path.exists(os.path.join(source, "MANIFEST.json")) or os.path.basename(source).startswith(CKPT_PREFIX):
        return verify_checkpoint(source)
    ckpt = latest_checkpoint(os.path.join(source, "checkpoints"))
    if ckpt is None:
        raise UserError(f"init_from=resume: no complete checkpoint in {os.path.join(source, 'checkpoints')}; "
                        f"train with init_from=scratch first (or set resume_from)")
    return verify_checkpoint(ckpt)


def resume_config(cfg, log):
    """init_from=resume: (config, checkpoint, trainer_state). The run's own config, overridden only by the keys
    the user set explicitly (YAML or command line); a different model shape is refused."""
    ckpt = find_resume_checkpoint(cfg)
    log(f"Resuming training from {ckpt}")
    try:
        with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt}/trainer_state.json is unreadable ({e}); resume from another checkpoint") from e
    explicit = {k: cfg[k] for k in cfg.get("_explicit", []) if k in cfg}
    _check_shape(explicit, state["model_shape"], ckpt)
    merged = {**state["config"], **explicit, "init_from": "resume"}
    merged["_explicit"] = cfg.get("_explicit", [])
    return merged, ckpt, state


def build_model(cfg, tokenizer, log, ckpt=None, ckpt_state=None):
    """The model for init_from: scratch, a checkpoint being resumed, gpt2*, a model folder or a hub id."""
    from .configuration_nanogpt import NanoGPTConfig
    from .modeling_nanogpt import NanoGPTForCausalLM

    init_from = cfg["init_from"]
    data_sig = tokenizer_signature(tokenizer)
    if ckpt is not None:
        check_same_vocabulary(ckpt_state["tokenizer"], data_sig, ckpt)
        return _adopt_model_shape(cfg, NanoGPTForCausalLM.from_pretrained(os.path.join(ckpt, "model"),
                                                                         dropout=cfg["dropout"]))
    _refuse_other_runs(cfg)
    if init_from == "scratch":
        log("Initializing a new model from scratch")
        config = NanoGPTConfig(vocab_size=_vocab_size_for(tokenizer), block_size=cfg["block_size"],
                               n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                               dropout=cfg["dropout"], bias=cfg["bias"], activation_function=cfg["activation_function"],
                               pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        return NanoGPTForCausalLM(config)
    log(f"Initializing from {init_from}")
    model, model_tokenizer = load_model_and_tokenizer(init_from, dropout=cfg["dropout"])
    model_sig = tokenizer_signature(model_tokenizer)
    check_same_vocabulary(model_sig, data_sig, init_from)
    if cfg["block_size"] > model.config.block_size:
        raise UserError(f"block_size={cfg['block_size']} is larger than {init_from}'s context of "
                        f"{model.config.block_size}; use block_size <= {model.config.block_size}")
    if cfg["block_size"] < model.config.block_size:
        model.crop_block_size(cfg["block_size"])  # model surgery to decrease the block size if necessary
    return _adopt_model_shape(cfg, model)


def _adopt_model_shape(cfg, model):
    """The loaded model's shape wins over the config's, like nanoGPT (and the saved config says so)."""
    for key in ("n_layer", "n_head", "n_embd", "bias", "activation_function"):
        cfg[key] = getattr(model.config, key)
    return model


def _shape_of(model_config):
    return {k: getattr(model_config, k) for k in SHAPE_KEYS}


def _check_shape(cfg, ckpt_shape, where):
    for key in SHAPE_KEYS:
        # keys a checkpoint does not record (written before they existed) cannot disagree
        if key in cfg and key in ckpt_shape and key != "vocab_size" and cfg[key] != ckpt_shape[key]:
            raise UserError(f"{where} was trained with {key}={ckpt_shape[key]!r} but the config says {cfg[key]!r}: "
                            f"resume with the run's own config, or use another out_dir")


def _refuse_other_runs(cfg):
    """A fresh run must not mix with (or later prune) another run's checkpoints."""
    existing = checkpoint_dirs(os.path.join(cfg["out_dir"], "checkpoints"))
    if existing:
        raise UserError(f"out_dir {cfg['out_dir']} already holds checkpoints of a run ({os.path.basename(existing[-1])}): "
                        f"continue it with init_from=resume, or choose another out_dir")


def configure_optimizer(model, cfg, device_type):
    """nanoGPT's AdamW: weight decay on every 2D+ tensor (matmuls, embeddings), none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]  # shared (tied) tensors appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]))
    try:  # the fused kernel is faster, on CUDA and (torch >= 2.4) on CPU
        return torch.optim.AdamW(groups, fused=True, **kwargs), True
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs), False


def maybe_compile(model, cfg, log):
    if not cfg["compile"]:
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


# ------------------------------------------------------------------------------------------- data
def _streaming_source(cfg, accelerator, files, split, log):
    return StreamingBatches(cfg["block_size"], cfg["batch_size"], dataset=cfg["stream_dataset"] or None,
                            files=files or None, split=split, text_column=cfg["stream_text_column"],
                            rank=accelerator.process_index, world_size=accelerator.num_processes, log=log)


def make_train_source(cfg, accelerator, data_dir):
    if cfg["data_source"] == "streaming":
        return _streaming_source(cfg, accelerator, cfg["stream_files"], cfg["stream_split"], accelerator.print)
    return MemmapBatches(data_dir, "train", cfg["block_size"], cfg["batch_size"], cfg["seed"],
                         accelerator.process_index, accelerator.num_processes)


def make_eval_source(cfg, accelerator, data_dir, split, iter_num):
    """A fresh source per evaluation: deterministic (no training state to save), different at each eval."""
    if cfg["data_source"] == "streaming":
        files = cfg["stream_val_files"] if split == "val" else cfg["stream_files"]
        stream_split = cfg["stream_split"] if split == "train" or cfg["stream_val_files"] else cfg["stream_val_split"]
        return _streaming_source(cfg, accelerator, files, "train" if files else stream_split, lambda m: None)
    seed = cfg["seed"] * 1_000_003 + iter_num * 2 + (split == "val")
    return MemmapBatches(data_dir, split, cfg["block_size"], cfg["batch_size"], seed,
                         accelerator.process_index, accelerator.num_processes)


@torch.no_grad()
def estimate_loss(model, cfg, accelerator, data_dir, iter_num):
    """Mean loss over eval_iters batches per split, shared out across all ranks and gathered (not rank 0 alone)."""
    out = {}
    model.eval()
    local_iters = math.ceil(cfg["eval_iters"] / accelerator.num_processes)
    for split in ("train", "val"):
        fault_point("eval")
        source = make_eval_source(cfg, accelerator, data_dir, split, iter_num)
        losses = torch.zeros(local_iters, device=accelerator.device)
        for k in range(local_iters):
            x, y = (t.to(accelerator.device) for t in source.next_batch())
            with accelerator.autocast():
                losses[k] = model(x, shift_labels=y, use_cache=False).loss.float()
        out[split] = accelerator.gather_for_metrics(losses).mean().item()
    model.train()
    return out


# ------------------------------------------------------------------------------------------- saving
def _trainer_state(cfg, iter_num, best_val_loss, best_dir, tokens_per_iter, world, tokenizer, model, tracker_ids, val_loss):
    return dict(iter_num=iter_num, best_val_loss=best_val_loss, best_checkpoint=best_dir, val_loss=val_loss,
                tokens_seen=iter_num * tokens_per_iter, world_size=world, config=public_config(cfg),
                tokenizer=tokenizer_signature(tokenizer), model_shape=_shape_of(model.config), tracker_ids=tracker_ids)


def _weights_finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


def save_checkpoint(accelerator, model, optimizer, train_source, tokenizer, cfg, state):
    """Writes out_dir/checkpoints/ckpt-N atomically (see checkpoint.py), then refreshes the HF folder in out_dir.
    Returns the checkpoint path, or None when the weights are not finite (such a checkpoint is never written)."""
    unwrapped = accelerator.unwrap_model(model)
    finite = torch.tensor(float(_weights_finite(unwrapped)), device=accelerator.device)
    if accelerator.reduce(finite, reduction="sum").item() < accelerator.num_processes:
        accelerator.print("warning: weights are not finite: checkpoint NOT written")
        return None
    root = os.path.join(cfg["out_dir"], "checkpoints")
    final = os.path.join(root, f"{CKPT_PREFIX}{state['iter_num']:07d}")
    tmp = os.path.join(root, f".tmp-{CKPT_PREFIX}{state['iter_num']:07d}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    save_tree(os.path.join(tmp, f"rank{accelerator.process_index}"), {"rng": rng_state(), "data": train_source.state_dict()})
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP: every rank calls it
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(os.path.join(tmp, "model"), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(tmp, "model"))
        fault_point("checkpoint")  # half-written: weights there, optimizer and manifest not yet
        save_tree(os.path.join(tmp, "optimizer"), optimizer.state_dict())
        with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
        write_manifest(tmp)
        if os.path.isdir(final):  # the same iteration saved again by a rerun from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(root, cfg["keep_last"], state.get("best_checkpoint"))
        save_model_folder(unwrapped, tokenizer, cfg["out_dir"])
    accelerator.wait_for_everyone()
    return final


def restore_training_state(ckpt, accelerator, optimizer, train_source, log):
    optimizer.load_state_dict(load_tree(os.path.join(ckpt, "optimizer")))
    rank_file = os.path.join(ckpt, f"rank{accelerator.process_index}")
    if not os.path.exists(rank_file + ".json"):
        log(f"warning: {ckpt} was saved with fewer processes: rank {accelerator.process_index} starts fresh RNG/data")
        return
    saved = load_tree(rank_file)
    set_rng_state(saved["rng"])
    try:
        train_source.load_state_dict(saved["data"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{ckpt}: its data position does not fit data_source={type(train_source).__name__} ({e})") from e


# ------------------------------------------------------------------------------------------- logging
class RunLog:
    """out_dir/log.jsonl (always) plus Accelerate's trackers (W&B, TensorBoard) on the main process."""

    def __init__(self, accelerator, cfg, resume_iter=None):
        self.accelerator = accelerator
        self.path = os.path.join(cfg["out_dir"], "log.jsonl")
        self.file = None
        if accelerator.is_main_process:
            if resume_iter is not None and os.path.exists(self.path):
                self._truncate(resume_iter)  # steps after the checkpoint are replayed: drop their old records
            # opened once, line-buffered: every record reaches the file as it is logged, without an open per step
            self.file = open(self.path, "a", encoding="utf-8", buffering=1)

    def _truncate(self, resume_iter):
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("iter", 0) < resume_iter]
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def log(self, record):
        if self.file is None:  # not the main process
            return
        self.file.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "iter"}, step=record["iter"])

    def close(self):
        if self.file is not None:
            self.file.close()


def init_trackers(accelerator, cfg, tracker_ids):
    if not accelerator.log_with:
        return tracker_ids
    ids = dict(tracker_ids or {})
    init_kwargs = {}
    if any(getattr(t, "value", t) == "wandb" for t in accelerator.log_with):
        if "wandb" not in ids:
            import secrets

            ids["wandb"] = secrets.token_hex(4)  # W&B run ids: lowercase letters and digits
        # the same id + resume="allow": a resumed run continues the same W&B run
        init_kwargs["wandb"] = {"name": cfg["wandb_run_name"], "id": ids["wandb"], "resume": "allow", "dir": cfg["out_dir"]}
    scalars = {k: v for k, v in public_config(cfg).items() if not isinstance(v, list)}
    accelerator.init_trackers(cfg["wandb_project"], config=scalars, init_kwargs=init_kwargs)
    return ids


# ------------------------------------------------------------------------------------------- the loop
def train(cfg):
    accelerator = make_accelerator(cfg)
    log = accelerator.print
    world = accelerator.num_processes

    ckpt = ckpt_state = None
    if cfg["init_from"] == "auto":  # torchrun --max-restarts: the same command resumes after a crash
        found = latest_checkpoint(os.path.join(cfg["out_dir"], "checkpoints"))
        cfg["init_from"] = "resume" if found else "scratch"
    if cfg["init_from"] == "resume":
        cfg, ckpt, ckpt_state = resume_config(cfg, log)
    with accelerator.main_process_first():  # reading (and in streaming, caching) the data once
        tokenizer = data_tokenizer(cfg)
    torch.manual_seed(cfg["seed"])  # the same initial weights whatever the number of processes
    model = build_model(cfg, tokenizer, log, ckpt, ckpt_state)
    torch.manual_seed(cfg["seed"] + accelerator.process_index)  # dropout differs per rank, like nanoGPT
    if accelerator.is_main_process:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        with open(os.path.join(cfg["out_dir"], "train_config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(public_config(cfg), f, sort_keys=False)

    gas = cfg["gradient_accumulation_steps"] // world
    tokens_per_iter = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["block_size"]
    data_dir = _data_dir(cfg)
    optimizer, fused = configure_optimizer(model, cfg, accelerator.device.type)
    model = maybe_compile(model, cfg, log)
    model, optimizer = accelerator.prepare(model, optimizer)
    train_source = make_train_source(cfg, accelerator, data_dir)
    iter_num, best_val_loss, best_dir, tracker_ids = 0, 1e9, None, {}
    if ckpt:
        restore_training_state(ckpt, accelerator, optimizer, train_source, log)
        iter_num, best_val_loss = ckpt_state["iter_num"], ckpt_state["best_val_loss"]
        best_dir, tracker_ids = ckpt_state.get("best_checkpoint"), ckpt_state.get("tracker_ids", {})
    resume_iter = iter_num if ckpt else None
    tracker_ids = init_trackers(accelerator, cfg, tracker_ids)
    run_log = RunLog(accelerator, cfg, resume_iter)

    raw_model = accelerator.unwrap_model(model)
    n_params = raw_model.get_num_params()
    peak = peak_flops(accelerator.device, dtype={"bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32))
    flops_per_iter = raw_model.flops_per_token(cfg["block_size"]) * tokens_per_iter / world  # per process (MFU per device)
    log(f"world size {world} | tokens per iteration will be: {tokens_per_iter:,} "
        f"({cfg['gradient_accumulation_steps']} accumulation x {cfg['batch_size']} batch x {cfg['block_size']} block; "
        f"{gas} micro-steps per process)")
    log(f"number of parameters: {n_params / 1e6:.2f}M | device {accelerator.device} | precision "
        f"{accelerator.mixed_precision} | fused AdamW {fused} | compile {cfg['compile']} | data {cfg['data_source']}")

    bar = tqdm(total=cfg["max_iters"], initial=min(iter_num, cfg["max_iters"]), desc="training",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True, file=sys.stdout)
    bad_steps, running_mfu, last_val = 0, -1.0, None
    model.train()
    t0 = time.perf_counter()
    if cfg["eval_only"]:  # one evaluation of the model as it is, then exit (nothing saved)
        losses = estimate_loss(model, cfg, accelerator, data_dir, iter_num)
        log(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        run_log.log({"iter": iter_num, "train/loss_eval": losses["train"], "val/loss": losses["val"],
                     "val/perplexity": math.exp(min(losses["val"], 50))})
        run_log.close()
        _finish(accelerator)
        return {"iter_num": iter_num, "val_loss": losses["val"], "train_loss": losses["train"]}
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # evaluate the loss on train/val sets and write checkpoints
        if iter_num % cfg["eval_interval"] == 0 and iter_num != resume_iter:
            losses = estimate_loss(model, cfg, accelerator, data_dir, iter_num)
            last_val = losses["val"]
            bar.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}") \
                if accelerator.is_local_main_process else None
            run_log.log({"iter": iter_num, "train/loss_eval": losses["train"], "val/loss": losses["val"],
                         "val/perplexity": math.exp(min(losses["val"], 50)), "lr": lr})
            if losses["val"] < best_val_loss or cfg["always_save_checkpoint"]:
                is_best = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > 0:
                    name = os.path.join(cfg["out_dir"], "checkpoints", f"{CKPT_PREFIX}{iter_num:07d}")
                    best_dir = name if is_best else best_dir
                    state = _trainer_state(cfg, iter_num, best_val_loss, best_dir, tokens_per_iter, world, tokenizer,
                                           raw_model, tracker_ids, losses["val"])
                    log(f"saving checkpoint to {name}")
                    if save_checkpoint(accelerator, model, optimizer, train_source, tokenizer, cfg, state):
                        _maybe_push(cfg, accelerator, "every_save")
        if iter_num >= cfg["max_iters"]:
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
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
        step_loss = loss_sum / gas
        if _all_finite(accelerator, step_loss, grad_norm) or accelerator.scaler is not None:
            optimizer.step()  # with fp16 the scaler skips overflowing steps itself
            bad_steps = 0
        else:
            bad_steps += 1
            log(f"warning: non-finite loss or gradient at iter {iter_num}: step skipped ({bad_steps} in a row)")
            if bad_steps >= cfg["max_bad_steps"]:
                bar.close()
                raise UserError(f"{bad_steps} non-finite steps in a row at iter {iter_num}: training diverged; lower "
                                f"learning_rate, raise warmup_iters or enable grad_clip, then resume from the last checkpoint")
        optimizer.zero_grad(set_to_none=True)

        t1 = time.perf_counter()
        dt, t0 = t1 - t0, t1
        iter_num += 1
        bar.update(1)
        if (iter_num - 1) % cfg["log_interval"] == 0:
            lossf = accelerator.reduce(step_loss, reduction="mean").item()
            if iter_num - 1 - (resume_iter or 0) >= 5:  # let the training loop settle a bit
                mfu = flops_per_iter / dt / peak
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            gn = grad_norm.item() if torch.is_tensor(grad_norm) else float(grad_norm)
            run_log.log({"iter": iter_num - 1, "train/loss": lossf, "lr": lr, "grad_norm": gn, "time_ms": dt * 1000,
                         "tokens_per_s": tokens_per_iter / dt, "mfu": max(running_mfu, 0.0)})
            # refresh=False: the bar redraws at most every 0.1 s (update's own throttle), not on every step
            bar.set_postfix(loss=f"{lossf:.4f}", lr=f"{lr:.2e}", ms=f"{dt * 1000:.1f}", mfu=f"{max(running_mfu, 0) * 100:.1f}%",
                            refresh=False)
    bar.close()
    if last_val is not None:
        log(f"done: iter {iter_num}, val loss {last_val:.4f} (best {best_val_loss:.4f}); model folder: {cfg['out_dir']}")
    run_log.close()
    _maybe_push(cfg, accelerator, "end")
    _finish(accelerator)
    return {"iter_num": iter_num, "val_loss": last_val, "best_val_loss": best_val_loss}


def _finish(accelerator):
    accelerator.wait_for_everyone()  # ranks leave together: a rank tearing down gloo early can hang its peer
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # torch 2.13 + gloo: gloo's work thread frees the last collectives' tensors after they have returned and
        # needs the GIL to do it. If the DDP model is freed first (under the GIL, when train() returns),
        # ~ProcessGroupGloo joins that thread and both wait forever (seen with gdb in a restarted torchrun worker).
        # Sleeping releases the GIL so the thread can finish first.
        time.sleep(0.2)


def _all_finite(accelerator, loss, grad_norm):
    """One decision for all ranks: a non-finite value on any rank skips the step everywhere."""
    gn = grad_norm if torch.is_tensor(grad_norm) else torch.tensor(float(grad_norm))
    bad = (~torch.isfinite(loss)).float() + (~torch.isfinite(gn.to(loss.device).float())).float()
    return accelerator.reduce(bad, reduction="sum").item() == 0


def _maybe_push(cfg, accelerator, when):
    if not cfg["push_to_hub"] or not accelerator.is_main_process:
        return
    if when == "every_save" and cfg["hub_strategy"] != "every_save":
        return
    from .hub import push_run

    push_run(cfg, include_training_state=cfg["hub_push_training_state"])


@cli_main
def main(argv=None):
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    return train(cfg)
