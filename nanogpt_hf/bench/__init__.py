"""nanogpt-bench: what nanogpt-hf's speed and memory are, each measured against a reference in the same run. One
module per measurement (train_step, generate, runs, speedrun, gpu; memory in ../memory.py), the shapes and timing
they share (common), and the command line (cli)."""

from .cli import main
from .common import SHAPES
from .generate import bench_generate
from .gpu import gpu_proof
from .runs import bench_prepare, bench_quickstart, bench_startup
from .speedrun import bench_speedrun
from .train_step import bench_train

__all__ = ["main", "SHAPES", "bench_train", "bench_generate", "bench_prepare", "bench_startup", "bench_quickstart",
           "bench_speedrun", "gpu_proof"]
