"""The optimizers: nanoGPT's AdamW, and Muon for the speedrun recipes; their state saved and loaded by parameter name.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) is torch.optim.Muon's algorithm with one
difference: Newton-Schulz runs in a dtype the trainer chooses (`muon_ns_dtype`) instead of always in bf16. On a
CPU without native bf16 (no AVX512-BF16/AMX) a bf16 matmul is emulated, and torch.optim.Muon's step took 990 ms
against 36 ms in fp32 for the CPU recipe's 16 matrices (docs/speedrun.md). The update equals torch.optim.Muon's in
the same dtype (tests/test_speedrun.py). Both optimizers can skip a step on the device (`found_inf`, as the
gradient scaler does), so the trainer need not wait for the GPU to decide whether gradients were finite.
"""

import itertools
import math

import torch

from .errors import UserError

__all__ = ["Muon", "configure_optimizer", "skip_step_if", "NS_DTYPES", "get_lr", "set_lr", "optimizer_state",
           "load_optimizer_state", "whole_tensor"]

NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def zeropower_via_newtonschulz(G, ns_coefficients, ns_steps, eps, dtype):
    """The quintic Newton-Schulz iteration of torch.optim.Muon (an approximate U V^T of G = U S V^T), in dtype."""
    a, b, c = ns_coefficients
    X = G.to(dtype)
    if G.size(0) > G.size(1):
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(ns_steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b * A + c * A @ A
        X = torch.addmm(X, B, X, beta=a)  # a * X + B @ X
    if G.size(0) > G.size(1):
        X = X.T
    return X


class Muon(torch.optim.Optimizer):
    """Momentum orthogonalized by Newton-Schulz for 2-D weights; torch.optim.Muon's defaults and state
    ("momentum_buffer"), so checkpoints of either load in the other. ns_dtype: torch.bfloat16 (torch's choice) or
    torch.float32. A `found_inf` attribute (a 0-dim tensor, 1.0 for a bad step) skips the step on the device."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5, ns_dtype=torch.bfloat16):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon only optimizes 2-D weights")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip = getattr(self, "found_inf", None)
        work = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        momentum = (self._momentum_update(group, p) for group, p in work)  # computed as _orthogonalized asks
        for (group, p), (buf, new_buf, update) in zip(work, _orthogonalized(momentum, self.ns_dtype)):
            lr = group["lr"]
            # Keller Jordan's scale: the same update RMS for tall and wide matrices (torch's adjust_lr "original")
            adjusted_lr = lr * math.sqrt(max(1, p.size(0) / p.size(1)))
            new_p = p.mul(1 - lr * group["weight_decay"]).add_(update, alpha=-adjusted_lr)
            if skip is not None:  # a non-finite step changes nothing (where, not a product: NaN * 0 is NaN)
                new_buf, new_p = torch.where(skip > 0, buf, new_buf), torch.where(skip > 0, p, new_p)
            buf.copy_(new_buf)
            p.copy_(new_p)
        return loss

    def _momentum_update(self, group, p):
        """(momentum buffer, its new value, the Nesterov update to orthogonalize, its Newton-Schulz)."""
        state, momentum = self.state[p], group["momentum"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        new_buf = buf.lerp(p.grad, 1 - momentum)
        update = p.grad.lerp(new_buf, momentum) if group["nesterov"] else new_buf
        return buf, new_buf, update, lambda G: zeropower_via_newtonschulz(
            G, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)


def _orthogonalized(items, dtype):
    """For each (buf, new_buf, update, newton_schulz) in order, (buf, new_buf, newton_schulz(update)), which computes
    in dtype. One process: one matrix at a time. DTensor updates (FSDP2 shards): the matrices are dealt out to the
    ranks in turn, a chunk of one per rank at a time; each is gathered whole, orthogonalized by its rank while the
    others orthogonalize theirs, and broadcast back, each rank keeping its shard. The collectives are asynchronous:
    the next chunk's gathers run during this chunk's Newton-Schulz, and a rank goes on to its own matrix without
    waiting for the others' (c38e359 waited on each matrix's broadcast in turn, so one rank computed at a time). 2
    collectives per matrix, where Newton-Schulz op by op on the shards issued ~13.5 (an all-reduce for each norm,
    an all-gather for each matmul) and every rank did every matrix (modded-nanogpt spreads them the same way). The
    result is the one-process computation's, on the same whole matrix."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    items = iter(items)
    first = next(items, None)
    if first is None:
        return
    items = itertools.chain([first], items)
    if not isinstance(first[2], DTensor):
        for buf, new_buf, update, newton_schulz in items:
            yield buf, new_buf, newton_schulz(update)
        return
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    chunks = iter(lambda: list(itertools.islice(items, world)), [])  # the k-th matrix of a chunk is rank k's

    def gathering(chunk):  # every rank gets each whole matrix (the mesh's shards); issued now, waited where used
        return [(item, item[2].full_tensor()) for item in chunk]

    ahead = gathering(next(chunks, []))
    while ahead:
        current, ahead = ahead, gathering(next(chunks, []))
        results = [newton_schulz(whole).contiguous() if owner == rank else
                   torch.empty(whole.shape, dtype=dtype, device=whole.device)
                   for owner, ((_, _, _, newton_schulz), whole) in enumerate(current)]
        handles = [dist.broadcast(result, src=owner, async_op=True) for owner, result in enumerate(results)]
        for ((buf, new_buf, update, _), _), result, handle in zip(current, results, handles):
            handle.wait()
            yield buf, new_buf, distribute_tensor(result, update.device_mesh, update.placements, src_data_rank=None)


# ------------------------------------------------------------------------------------------ the schedule
def get_lr(it, cfg):
    """nanoGPT's learning rate decay scheduler (cosine with linear warmup, floor at min_lr), or warmup-stable-decay
    (lr_schedule=wsd: the peak until the last cooldown_frac of lr_decay_iters, then linear to min_lr; Hägele et al.
    2024, the speedrun's schedule). AdamW's rate; Muon's is scaled alongside (see set_lr)."""
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


def set_lr(optimizers, lr):
    """Every group at the schedule's rate times its lr_scale (Muon's groups: muon_lr / learning_rate)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def configure_optimizer(model, cfg, ns_dtype=torch.float32):
    """nanoGPT's AdamW: weight decay on every 2D+ tensor (matmuls, embeddings), none on biases and LayerNorms.
    optimizer=muon: the blocks' 2-D weights go to Muon instead, at muon_lr; the embeddings, the head, gains and
    biases stay with AdamW (as in modded-nanogpt). Returns ([optimizers], fused)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # shared (tied) tensors appear once
    to_muon = [cfg.optimizer == "muon" and p.dim() == 2 and ".h." in f".{n}" for n, p in named]
    muon = [p for (_, p), m in zip(named, to_muon) if m]
    decay = [p for (_, p), m in zip(named, to_muon) if p.dim() >= 2 and not m]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    try:  # the fused kernel is faster, on CUDA and (torch >= 2.4) on CPU, and can skip a step on the device
        adamw, fused = torch.optim.AdamW(groups, fused=True, **kwargs), True
    except (RuntimeError, TypeError, ValueError):
        adamw, fused = torch.optim.AdamW(groups, **kwargs), False
    if not muon:
        return [adamw], fused
    scale = cfg.muon_lr / cfg.learning_rate if cfg.learning_rate else 0.0
    return [adamw, Muon([{"params": muon, "lr_scale": scale}], lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                        momentum=cfg.muon_momentum, ns_dtype=ns_dtype)], fused


def skip_step_if(optimizers, bad):
    """Makes the next step() of each optimizer a no-op on the device where `bad` (a 0-dim float tensor) is > 0,
    without the host reading it: fused AdamW's found_inf (what torch's GradScaler uses; its step count is rolled back
    too) and Muon's. Returns False, setting nothing, where an optimizer cannot (the caller then decides on the host)."""
    inner = [getattr(o, "optimizer", o) for o in optimizers]
    can = all(isinstance(o, Muon) or (isinstance(o, torch.optim.AdamW) and o.defaults.get("fused")) for o in inner)
    if can:
        for o in inner:
            o.found_inf = bad
    return can


# ------------------------------------------------------------------------------------ optimizer state
# One format for one process, DDP and FSDP2: the state of each parameter under its name (the model's first name for
# it: lm_head.weight is tied to transformer.wte.weight and stored once), each tensor whole. torch.distributed.
# checkpoint's get/set_state_dict was tried first: with the tied head, set_state_dict put AdamW's moments on the
# wrong parameters (weights from h.1 on differed by ~4e-4 after one step), so the mapping is done here.
def whole_tensor(t, keep):
    """A DTensor shard (FSDP2) gathered from every rank (a collective every rank joins), moved to the CPU where kept;
    other tensors as they are. keep=False (the ranks that do not write): nothing is copied to the host and the
    gathered tensor is freed at once, so such a rank holds one tensor on its device at a time and nothing more."""
    from torch.distributed.tensor import DTensor

    whole = t.full_tensor() if isinstance(t, DTensor) else t
    return whole.detach().cpu() if keep else None


def _like(stored, param):
    """The saved whole tensor as this process holds it: under FSDP2 this rank's shard of a DTensor parameter, else
    the whole tensor. Where it is still in its file (checkpoint.load_tree(lazy=True)) only the shard's rows are read,
    so a rank reads and holds about 1/world of the state, not all of it."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from .tensor_files import TensorInFile, read_whole

    if not (isinstance(param, DTensor) and tuple(stored.shape) == tuple(param.shape)):
        return read_whole(stored)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    whole_rows = all(o == 0 and n == full for o, n, full in zip(offset[1:], shape[1:], param.shape[1:]))
    if isinstance(stored, TensorInFile) and whole_rows:  # FSDP2's Shard(0): a range of rows, read alone
        local = stored.rows(offset[0], offset[0] + shape[0]).to(param.device)
    else:  # a copy of its own: a view would keep the whole tensor (on a GPU, all of it on every rank)
        local = read_whole(stored)[tuple(slice(o, o + n) for o, n in zip(offset, shape))].to(param.device, copy=True)
    return DTensor.from_local(local.contiguous(), param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())  # (this rank's rows, ...)


def _held_bytes(tensor):
    """The bytes this rank holds of a tensor: its shard of a DTensor."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def _param_names(model):
    return {p: name for name, p in model.named_parameters()}


def _unwrapped(optimizers):
    """A list of torch optimizers from one optimizer or a list (accelerate's AcceleratedOptimizer unwrapped)."""
    optimizers = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
    return [getattr(o, "optimizer", o) for o in optimizers]


def optimizer_state(model, optimizers, keep=True, whole=True):
    """{"state": {name: {key: value}}, "param_groups": [{..., "params": [names]}]}, tensors whole and on the CPU;
    several optimizers (Muon + AdamW) give their groups in order. Under FSDP every rank must call this (the shards
    are gathered, one tensor at a time); ranks with keep=False join the gathers, keep nothing and get None (on an
    8-GPU node of gpt2-xl, 12.5 GB of host memory once instead of on every rank). whole=False: the tensors as the
    optimizer holds them (shards under FSDP), for checkpoint.stream_tree to gather one at a time."""
    names = _param_names(model)
    state, groups = {}, []
    for optimizer in _unwrapped(optimizers):
        for group in optimizer.param_groups:
            for p in group["params"]:
                values = {k: (whole_tensor(v, keep) if whole else v) if torch.is_tensor(v) else v
                          for k, v in optimizer.state.get(p, {}).items()}
                if values and keep:
                    state[names[p]] = values
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [names[p] for p in group["params"]]})
    return {"state": state, "param_groups": groups} if keep else None


def load_optimizer_state(model, optimizers, saved, where):
    """Puts a state from optimizer_state() into the optimizers, each tensor sharded like its parameter; tensors left
    in their file (load_tree(lazy=True)) are read a rank's shard at a time. A state saved by the first release
    (torch's own state_dict, keyed by position) loads as it is. Returns the bytes read from the file."""
    from .tensor_files import TensorInFile, read_whole

    optimizers = _unwrapped(optimizers)
    if saved["param_groups"] and all(isinstance(i, int) for g in saved["param_groups"] for i in g["params"]):
        if len(optimizers) != 1:
            raise UserError(f"{where}: its optimizer state is AdamW's alone; resume with optimizer=adamw")
        state = {i: {k: read_whole(v) for k, v in values.items()} for i, values in saved["state"].items()}
        optimizers[0].load_state_dict({**saved, "state": state})
        return sum(_held_bytes(state[i][k]) for i, values in saved["state"].items() for k, v in values.items()
                   if isinstance(v, TensorInFile))
    params = dict(model.named_parameters())
    names = _param_names(model)
    current = [[names[p] for p in g["params"]] for o in optimizers for g in o.param_groups]
    stored = [g["params"] for g in saved["param_groups"]]
    if current != stored:
        raise UserError(f"{where}: its optimizer state is for other parameters or another optimizer "
                        f"({sum(map(len, stored))} in {len(stored)} groups, this run has {sum(map(len, current))} in "
                        f"{len(current)}): resume with the run's own model and optimizer settings")
    saved_groups, read = iter(saved["param_groups"]), 0
    for optimizer in optimizers:
        mine = [next(saved_groups) for _ in optimizer.param_groups]
        order = [name for group in mine for name in group["params"]]
        state = {}
        for i, name in enumerate(order):
            for key, value in saved["state"].get(name, {}).items():
                if torch.is_tensor(value) or isinstance(value, TensorInFile):
                    in_file, value = isinstance(value, TensorInFile), _like(value, params[name])
                    read += _held_bytes(value) if in_file else 0
                state.setdefault(i, {})[key] = value
        position = iter(range(len(order)))
        groups = [{**group, "params": [next(position) for _ in group["params"]]} for group in mine]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    return read
