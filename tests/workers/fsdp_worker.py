"""One training leg for tests/test_sharded.py, run under torchrun: a tiny NanoGPT, optionally FSDP2-sharded
(torch.distributed.fsdp.fully_shard, one unit per Block like accelerate_configs/fsdp.yaml) over gloo on the CPU,
trained with the trainer's AdamW for a few steps, its weights and optimizer state saved through the checkpoint code.

  torchrun --nproc_per_node W fsdp_worker.py --fsdp 0|1 [--load DIR] --steps N --save DIR [--save_at K --save_mid DIR]
      [--optimizer adamw|muon]

The global batch of step s is the same whatever W is (rank r takes its slice), so legs on 1 and 2 processes train
the same model. After loading, the optimizer state as the processes now hold it is written to DIR/loaded.*.
"""

import argparse
import os
import sys
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import tiny_model  # noqa: E402

from nanogpt_hf.checkpoint import load_optimizer_state, load_tree, optimizer_state, save_tree  # noqa: E402
from nanogpt_hf.config import TrainConfig  # noqa: E402
from nanogpt_hf.optim import configure_optimizer  # noqa: E402

GLOBAL_BATCH = 4


def batch(step, rank, world, config):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, config.vocab_size, (GLOBAL_BATCH, config.block_size + 1), generator=g)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    return x[rows, :-1], x[rows, 1:]


def model_state(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in state.items() if k != "lm_head.weight"}  # tied to wte: stored once


def save(folder, model, optimizer, rank):
    weights, opt = model_state(model), optimizer_state(model, optimizer, keep=rank == 0)
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        save_file(weights, os.path.join(folder, "model.safetensors"))
        save_tree(os.path.join(folder, "optimizer"), opt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--load")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save", required=True)
    ap.add_argument("--save_at", type=int, default=-1)
    ap.add_argument("--save_mid")
    ap.add_argument("--optimizer", default="adamw")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = tiny_model(seed=0).train()
    start = 0
    if args.load:
        model.load_state_dict(load_file(os.path.join(args.load, "model.safetensors")), strict=False)  # lm_head is tied
        start = int(open(os.path.join(args.load, "step")).read())
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    optimizer, _ = configure_optimizer(model, TrainConfig(learning_rate=1e-2, optimizer=args.optimizer))  # a list
    if args.load:
        load_optimizer_state(model, optimizer, load_tree(os.path.join(args.load, "optimizer")), args.load)
        loaded = optimizer_state(model, optimizer, keep=rank == 0)
        if rank == 0:
            save_tree(os.path.join(args.save + "-loaded"), loaded)

    for step in range(start, start + args.steps):
        x, y = batch(step, rank, world, model.config)
        loss = model(x, labels=None, shift_labels=y, use_cache=False).loss
        loss.backward()
        if world > 1 and not args.fsdp:  # plain data parallel by hand (FSDP averages the gradients itself)
            for p in model.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        for opt in optimizer:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step + 1 == args.save_at:
            save(args.save_mid, model, optimizer, rank)
            if rank == 0:
                open(os.path.join(args.save_mid, "step"), "w").write(str(step + 1))
    save(args.save, model, optimizer, rank)
    if rank == 0:
        open(os.path.join(args.save, "step"), "w").write(str(start + args.steps))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
