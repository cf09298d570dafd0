"""nanogpt-bench: speed of our model against transformers' GPT2LMHeadModel of the same shape, in the same run.

    nanogpt-bench                                  # training step + generation at the default shapes
    nanogpt-bench --what train --shapes quickstart,baby --compile --json bench.json
    nanogpt-bench --what train --nanogpt_dir ../nanoGPT   # also time nanoGPT's own model.py, same run
    nanogpt-bench --what prepare --corpus_mb 200   # tokenization throughput and peak memory of prepare
    nanogpt-bench --what startup                   # accelerate launch -> first training step (quickstart)
    nanogpt-bench --what quickstart                # the whole CPU quickstart run: ms/iter and val loss
    nanogpt-bench --what memory                    # memory per GPU to finetune gpt2..gpt2-xl (memory.py)
    nanogpt-bench --what speedrun [--nanogpt_dir ../nanoGPT]   # time to nanoGPT's CPU loss: its command vs the
                                                   # speedrun config, side by side (docs/speedrun.md)
    nanogpt-bench --what gpu                       # one GPU: 124M compile+bf16 MFU, pipeline, FSDP, speedrun steps,
                                                   # generation (at most ~8 minutes; a CPU machine: one error line)

Every figure is the median of --repeats timed runs after --warmup untimed ones; ours and the references are
interleaved run by run, so a machine whose speed drifts affects all alike. References: transformers'
GPT2LMHeadModel as GPT-2 defines it (biases, tanh GELU), and with --nanogpt_dir the model.py of a nanoGPT clone
(its defaults: no biases, exact GELU). Ours runs with the trainer's defaults (no biases, exact GELU, fused
AdamW). The trainer's CPU allocator setting is process-wide, so all models here run with it. MFU uses
nanoGPT's FLOP count (6N + 12LHQT per token) against the peak: a matmul rate measured in the same run on CPU,
the data-sheet bf16 peak on known GPUs, or --peak-flops.
"""

import argparse
import json
import time

import torch

from ..errors import UserError, cli_main
from ..hardware import keep_freed_memory_mapped, measured_matmul_flops, peak_flops, resolve_device
from .common import SHAPES, WHATS
from .generate import bench_generate
from .gpu import gpu_proof
from .runs import bench_prepare, bench_quickstart, bench_startup
from .speedrun import bench_speedrun
from .train_step import bench_train, profile_step


def _mfu_text(mfu):
    """An MFU above 100% means the peak measured at start-up was depressed (other load on the machine then)."""
    return f"{mfu * 100:5.1f}% MFU" if mfu <= 1.0 else "MFU n/a: the measured peak is unreliable (machine busy?)"


def _print(result):
    what = result["what"]
    if what == "train_step":
        ms, mfu = result["ms_per_step"], result["mfu"]
        print(f"train {result['shape']:<10} {result['dtype']:<8} compile={result['compile']!s:<5} | "
              f"ours {ms['nanogpt_hf']:8.1f} ms ({_mfu_text(mfu['nanogpt_hf'])}) | GPT2LMHeadModel "
              f"{ms['GPT2LMHeadModel']:8.1f} ms ({_mfu_text(mfu['GPT2LMHeadModel'])}) | "
              f"speed-up x{result['speedup_vs_GPT2LMHeadModel']:.2f}" +
              (f" | nanoGPT {ms['nanoGPT']:8.1f} ms, speed-up x{result['speedup_vs_nanoGPT']:.2f}" if "nanoGPT" in ms else ""))
    elif what == "generate":
        gb = lambda key: (result.get(key) or float("nan") * 1e9) / 1e9  # noqa: E731
        print(f"generate {result['shape']}, batch 1, {result['new_tokens']} new tokens (tokens/s; MB each token reads; "
              f"the share of the bound set by this machine's read rate, measured before each run, of a 1 GiB buffer "
              f"(median {gb('read_bandwidth'):.1f} GB/s) | of a buffer the weights' size ({gb('weights_read_bandwidth'):.1f}"
              f" GB/s); x GPT2LMHeadModel's same path; x plain F.linear decoding; fp32 paths give the same tokens: "
              f"{result['same_tokens_fp32_paths']})")
        for name, tps in result["tokens_per_s"].items():
            ratio = result["vs_GPT2LMHeadModel"].get(name)
            plain = (result.get("vs_plain_linear") or {}).get(name)
            share = (result.get("of_bandwidth_bound") or {}).get(name)
            weights_share = (result.get("of_weights_bandwidth_bound") or {}).get(name)
            without_draw = (result.get("of_bandwidth_bound_without_draw") or {}).get(name)
            print(f"  {name:<42} {tps:8.0f} tok/s {result['bytes_per_token'][name] / 1e6:7.1f} MB"
                  + (f" {share * 100:5.1f}% | {weights_share * 100:5.1f}% of bound" if share else "")
                  + (f"   x{ratio:.2f}" if ratio else "") + (f"   x{plain:.2f} F.linear" if plain else "")
                  + (f"   {without_draw * 100:.1f}% without the draw" if without_draw else ""))
        if result.get("draw_seconds_per_token"):
            print(f"  (the draw: torch.multinomial over {result['vocab_size']:,} probabilities, "
                  f"{result['draw_seconds_per_token'] * 1e3:.2f} ms a token, paid by every sampling path)")
        for label, kernel in (result.get("kernels") or {}).items():
            times = ", ".join(f"{k} {us:.0f}" for k, us in sorted(kernel["median_us"].items(), key=lambda kv: kv[1]))
            print(f"  kernel for {label:<34} {kernel['chosen']:<11} (median us: {times})")
    elif what == "prepare":
        print(f"prepare {result['corpus_mb']:.0f} MB, num_proc {result['num_proc']} | {result['seconds']:.1f} s, "
              f"{result['end_to_end_mb_per_s']:.1f} MB/s end to end, tokenizer {result['tokenize_mb_per_s']:.1f} MB/s | "
              f"peak RSS {result['peak_rss_mb']:.0f} MB")
    elif what == "quickstart":
        print(f"quickstart (CPU config): {result['iters']} iterations, median {result['median_ms_per_iter']:.1f} ms/iter, "
              f"val loss {result['val_loss']:.4f} at iteration {result['val_loss_iter']}, {result['seconds']:.0f} s in all")
    elif what == "startup":
        print(f"startup: accelerate launch -> first training step {result['seconds_to_first_step']:.2f} s")
    elif what == "speedrun":
        reached = (f"reaches it in {result['speedrun_seconds']:.1f} s: x{result['time_ratio']:.2f} of the time"
                   if result["reached"] else f"does NOT reach it (val loss {result['speedrun_val_loss']:.4f} "
                                              f"after {result['speedrun_seconds']:.1f} s)")
        print(f"speedrun: {result['classic']} ({result['classic_params'] / 1e6:.2f}M params) reaches val loss "
              f"{result['target_val_loss']:.4f} (full pass) in {result['classic_seconds']:.1f} s; {result['config']} "
              f"({result['speedrun_params'] / 1e6:.2f}M params) {reached}, val loss {result['speedrun_val_loss']:.4f}")
        ms = lambda v: "n/a" if v is None else f"{v:.1f} ms"  # noqa: E731
        print(f"speedrun: per iteration (median of the logged steps) {ms(result['classic_ms_per_iter'])} x "
              f"{result['classic_iters']} iterations against {ms(result['speedrun_ms_per_iter'])} x "
              f"{result['speedrun_iters']} (Muon's Newton-Schulz in {result['muon_ns_dtype']}); the rest of each wall "
              f"time is start-up and evaluation")
        equal = result["classic_at_equal_time"]
        if equal:
            print(f"speedrun: at {result['speedrun_seconds']:.1f} s the classic run was at iteration {equal[1]} with val "
                  f"loss {equal[2]:.4f} (its own estimate, at {equal[0]:.1f} s) against the speedrun's "
                  f"{result['speedrun_val_loss']:.4f}")
        else:
            print(f"speedrun: at {result['speedrun_seconds']:.1f} s the classic run had not evaluated yet")
    elif what == "gpu":
        print(f"GPU proof on {result['device']}:")
        for name, value in result["rows"]:
            print(f"  {name:<28} {value}")
    elif what == "memory":
        from ..memory import format_memory_table

        print(format_memory_table(result["rows"]))
    elif what == "peak":
        print(f"peak {result['dtype']}: {result['flops'] / 1e9:.0f} GFLOP/s ({result['source']})")


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="nanogpt-bench", description=__doc__.splitlines()[0])
    p.add_argument("--what", default="train,generate", help="comma list of: " + ", ".join(WHATS))
    p.add_argument("--shapes", default=None, help=f"training shapes, comma list of {', '.join(SHAPES)} "
                                                   f"(default: quickstart,baby on CPU, all on GPU)")
    p.add_argument("--dtypes", default="auto", help="float32, bfloat16, float16 (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-flops", "--peak_flops", dest="peak_flops", type=float, default=None)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--corpus_mb", type=float, default=200)
    p.add_argument("--num_proc", type=int, default=2)
    p.add_argument("--seed", type=int, default=None, help="quickstart: another seed than the config's")
    p.add_argument("--quickstart_iters", type=int, default=None, help="quickstart: fewer iterations than the config's")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--profile", default=None, help="write a torch profiler trace of one training step here")
    p.add_argument("--nanogpt_dir", default=None, help="a clone of karpathy/nanoGPT: its model.py is timed too "
                                                        "(train), its train.py is the classic run (speedrun)")
    p.add_argument("--speedrun_config", default="speedrun_shakespeare_char_cpu", help="speedrun: the recipe to race")
    p.add_argument("--default_allocator", action="store_true",
                   help="CPU: leave glibc malloc as it is (as other trainers run) instead of the trainer's setting")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    whats = args.what.split(",")
    unknown = set(whats) - set(WHATS)
    if unknown:
        raise UserError(f"--what: unknown {', '.join(sorted(unknown))}; choose from {', '.join(WHATS)}")
    if "gpu" in whats and device.type != "cuda":
        raise UserError("--what gpu proves the GPU path (124M with compile in bf16, FSDP, the speedrun, generation) "
                        "and needs a CUDA GPU; none is visible here")
    shapes = (args.shapes or ("quickstart,baby" if device.type == "cpu" else ",".join(SHAPES))).split(",")
    if set(shapes) - set(SHAPES):
        raise UserError(f"--shapes: unknown {', '.join(sorted(set(shapes) - set(SHAPES)))}; choose from {', '.join(SHAPES)}")
    dtypes = (["float32"] if device.type == "cpu" else ["bfloat16"]) if args.dtypes == "auto" else args.dtypes.split(",")
    if device.type == "cpu" and not args.default_allocator:  # the trainer's setting; process-wide: all models get it
        keep_freed_memory_mapped()
    results = [{"what": "machine", "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu_allocator": "default" if args.default_allocator else "trainer's (keep_freed_memory_mapped)",
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "date": time.strftime("%Y-%m-%d")}]

    def report(result):
        results.append(result)
        _print(result)

    peaks = {}
    if "train" in whats:
        for dtype in dtypes:  # on CPU each dtype's own matmul rate (bf16 runs on AMX where the CPU has it)
            peaks[dtype] = peak_flops(device, args.peak_flops, getattr(torch, dtype))
            source = "--peak-flops" if args.peak_flops else (
                "data sheet" if device.type == "cuda" else f"measured {dtype} matmul 2048^3")
            report({"what": "peak", "dtype": dtype, "flops": peaks[dtype], "source": source})
        for shape in shapes:
            for dtype in dtypes:
                for compiled in ([False, True] if args.compile else [False]):
                    report(bench_train(shape, device, peaks[dtype], args.warmup, args.repeats, compiled, dtype,
                                       args.nanogpt_dir))
        if device.type == "cpu":  # the matmul rate drifts on a shared machine: measure it again after
            report({"what": "peak", "dtype": "float32", "flops": measured_matmul_flops(),
                    "source": "re-measured after training"})
    if "generate" in whats:
        for shape in (args.shapes or "quickstart,baby").split(","):
            report(bench_generate(device, shape, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                  warmup=1, repeats=max(1, args.repeats // 2), compiled=args.compile))
    if "prepare" in whats:
        report(bench_prepare(args.corpus_mb, args.num_proc))
    if "startup" in whats:
        report(bench_startup())
    if "quickstart" in whats:
        report(bench_quickstart(args.seed, args.quickstart_iters))
    if "speedrun" in whats:
        report(bench_speedrun(args.nanogpt_dir, args.speedrun_config))
    if "gpu" in whats:
        report(gpu_proof(device))
    if "memory" in whats:
        from ..memory import memory_table

        report({"what": "memory", "rows": memory_table()})
    if args.profile:
        profile_step(shapes[0], device, args.profile)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results
