"""nanogpt-export SRC DEST: write the vanilla transformers GPT2LMHeadModel folder of any checkpoint (an out_dir,
a model folder, a hub id), with its tokenizer (GPT-2 BPE or the stock char one). Loads with no remote code."""

import argparse
import os

from .errors import UserError, cli_main
from .fileio import check_writable_place
from .model_io import load_model_and_tokenizer
from .tokenization import char_tokenizer, char_vocabulary

__all__ = ["main", "export_gpt2"]


def export_gpt2(source, dest):
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise UserError(f"{dest} exists and is not an empty folder: choose a new folder (nothing was overwritten)")
    check_writable_place(os.path.join(dest, "config.json"), f"DEST {dest}")
    model, tokenizer = load_model_and_tokenizer(source)
    try:
        gpt2 = model.to_gpt2()
    except ValueError as e:
        raise UserError(f"{source}: cannot export to GPT-2: {e}") from e
    gpt2.save_pretrained(dest, safe_serialization=True)
    chars = char_vocabulary(tokenizer)
    if chars is not None:  # a folder of nanogpt-hf 0.1 has the hand-written char tokenizer: export the stock one
        tokenizer = char_tokenizer(list(chars), model_max_length=model.config.block_size)
    tokenizer.save_pretrained(dest)
    return dest


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="nanogpt-export", description=__doc__)
    p.add_argument("source", help="an out_dir, a model folder, or a hub id")
    p.add_argument("dest", help="a new folder for the GPT2LMHeadModel")
    args = p.parse_args(argv)
    print(f"wrote {export_gpt2(args.source, args.dest)} (GPT2LMHeadModel)")


if __name__ == "__main__":
    main()
