"""nanogpt-plot OUT_DIR: train/val loss and learning rate from OUT_DIR/log.jsonl, as OUT_DIR/loss.png, then one
line saying which iteration the run's model folder holds."""

import argparse
import math
import os

from .errors import UserError, cli_main
from .run_dir import RunDir

__all__ = ["main", "plot_run"]


def plot_run(out_dir, path=None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UserError("plotting needs matplotlib: pip install matplotlib (or the [plot] extra)") from e
    records = RunDir(out_dir).read_log(warn=print)
    steps = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "val/loss" in r]
    if not steps and not evals:
        raise UserError(f"{out_dir}/log.jsonl has no losses yet")
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    losses = [math.nan if r["train/loss"] is None else r["train/loss"] for r in steps]  # null: a skipped step
    ax.plot([r["iter"] for r in steps], losses, lw=0.8, alpha=0.6, label="train (per step)")
    if evals:
        ax.plot([r["iter"] for r in evals], [r["train/loss_eval"] for r in evals], "o-", label="train (eval)")
        ax.plot([r["iter"] for r in evals], [r["val/loss"] for r in evals], "o-", label="val")
        best = min(evals, key=lambda r: r["val/loss"])
        ax.annotate(f"best val {best['val/loss']:.3f}", (best["iter"], best["val/loss"]), textcoords="offset points",
                    xytext=(-60, 15))
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(os.path.basename(os.path.abspath(out_dir)))
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot([r["iter"] for r in steps], [r["lr"] for r in steps], color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    path = path or os.path.join(out_dir, "loss.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="nanogpt-plot", description=__doc__)
    p.add_argument("out_dir")
    p.add_argument("--output", default=None, help="PNG path (default OUT_DIR/loss.png)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    args = p.parse_args(argv)
    path = plot_run(args.out_dir, args.output)
    if not args.quiet:
        print(f"wrote {path}")
        print(RunDir(args.out_dir).summary())
    return path


if __name__ == "__main__":
    main()
