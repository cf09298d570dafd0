#!/usr/bin/env bash
# The main job: prepare Tiny Shakespeare (shipped), train the baby GPT on whatever device is here, sample from it.
# On a GPU: nanoGPT's baby GPT (6 layers, 384 wide, block 256). On a CPU: nanoGPT's documented CPU config
# (4 layers, 128 wide, block 64, 2000 iterations, learning rate 3e-3: 75-100 s of training on 2 cores). Extra arguments go to the trainer,
# e.g. bash quickstart.sh --max_iters=500
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" data/shakespeare_char/prepare.py
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  config=train_shakespeare_char; launch=accelerate_configs/single_gpu.yaml
else
  config=train_shakespeare_char_cpu; launch=accelerate_configs/cpu.yaml
fi
# init_from=auto: a second run continues (or, when finished, just reuses) the first one instead of refusing
"$PY" -m accelerate.commands.launch --config_file "$launch" train_accelerate.py --config "$config" --init_from=auto "$@"
"$PY" -m nanogpt_hf.sample --out_dir out-shakespeare-char --start "ROMEO:" --num_samples 2 --max_new_tokens 300
# the loss curve (out-shakespeare-char/loss.png) and one line: which iteration the model folder holds, and its val loss
"$PY" -m nanogpt_hf.plot out-shakespeare-char
