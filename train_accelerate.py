"""Train a NanoGPT with Hugging Face Accelerate: CPU, one GPU, DDP or multi-node, chosen by the launcher.

    python train_accelerate.py --config train_shakespeare_char_cpu
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml train_accelerate.py --config train_shakespeare_char_cpu
    torchrun --nproc_per_node 2 train_accelerate.py --config train_shakespeare_char_cpu
    python train_accelerate.py --config-path=configs --config-name=finetune_shakespeare --init_from=gpt2

Every nanoGPT key works as --key=value; see nanogpt_hf/config.py for the defaults and nanogpt_hf/train.py
for the loop.
"""

from nanogpt_hf.train import main

if __name__ == "__main__":
    main()
