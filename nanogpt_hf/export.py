"""nanogpt-export SRC DEST: write the vanilla transformers GPT2LMHeadModel folder of any checkpoint (an out_dir,
a model folder, a hub id), with its tokenizer (GPT-2 BPE or the stock char one). Loads with no remote code.
`--format gguf` writes one GGUF file for llama.cpp's GPT-2 instead (DEST: a .gguf path; gguf_export.py)."""

import argparse
import os
import tempfile

from .errors import UserError, cli_main
from .fileio import check_writable_place
from .model_io import load_model_and_tokenizer
from .tokenization import portable_tokenizer

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
    portable_tokenizer(tokenizer, model.config.block_size).save_pretrained(dest)
    return dest


def _gguf_destination(dest):
    """One line unless dest is a new .gguf file in a folder that exists, its Modelfile name free too."""
    if not dest.endswith(".gguf"):
        raise UserError(f"DEST {dest}: a GGUF file's name ends in .gguf (e.g. {dest.rstrip('/')}.gguf)")
    folder = os.path.dirname(os.path.abspath(dest))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"DEST {dest}: {folder} is a file, not a folder: choose a path in a folder")
    if not os.path.isdir(folder):
        raise UserError(f"DEST {dest}: the folder {folder} does not exist: create it (mkdir -p {folder}) or choose "
                        f"another place")
    for path in (dest, modelfile_path(dest)):
        if os.path.exists(path):
            raise UserError(f"{path} exists: choose a new file name (nothing was overwritten)")
    check_writable_place(dest, f"DEST {dest}")


def modelfile_path(dest):
    """The Ollama Modelfile written beside DEST.gguf: DEST.Modelfile."""
    return dest[:-len(".gguf")] + ".Modelfile"


def export_gguf_file(source, dest, dtype):
    """The GGUF file of source at dest (a new .gguf path) and an Ollama Modelfile beside it (the model's context);
    returns the notes to print. Written to a temporary file of this export's own, then linked to dest: a complete
    file or none, and of two exports to one name the second stops with one line instead of overwriting the first."""
    from .gguf_export import export_gguf

    _gguf_destination(dest)
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise UserError("--format gguf needs the gguf package: pip install 'nanogpt-hf[serving]' (or pip install "
                        "gguf)") from e
    model, tokenizer = load_model_and_tokenizer(source)
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".partial",
                                   dir=os.path.dirname(os.path.abspath(dest)))
    os.close(handle)
    try:
        notes = export_gguf(model, tokenizer, tmp, dtype)
        os.link(tmp, dest)  # fails where dest appeared meanwhile (os.replace would overwrite it)
    except FileExistsError as e:
        raise UserError(f"{dest} was written meanwhile by another export: choose a new file name (nothing was "
                        f"overwritten)") from e
    finally:
        os.remove(tmp)
    context = model.config.block_size
    with open(modelfile_path(dest), "w", encoding="utf-8") as f:
        f.write(f"# ollama create NAME -f {os.path.basename(modelfile_path(dest))}: the model reads at most {context} "
                f"positions, prompt and answer\nFROM ./{os.path.basename(dest)}\nTEMPLATE \"{{{{ .Prompt }}}}\"\n"
                f"PARAMETER num_ctx {context}\n")
    return notes, context


@cli_main
def main(argv=None):
    from .gguf_export import GGUF_DTYPES

    p = argparse.ArgumentParser(prog="nanogpt-export", description=__doc__)
    p.add_argument("source", help="an out_dir, a model folder, or a hub id")
    p.add_argument("dest", help="a new folder for the GPT2LMHeadModel (--format gguf: a new .gguf file)")
    p.add_argument("--format", default="gpt2", choices=("gpt2", "gguf"),
                   help="gpt2: a transformers GPT2LMHeadModel folder; gguf: one file for llama.cpp, Ollama, LM Studio")
    p.add_argument("--dtype", default="f16", choices=GGUF_DTYPES,
                   help="gguf: the matrices' precision (norms, biases and positions stay f32)")
    args = p.parse_args(argv)
    if args.format == "gguf":
        notes, context = export_gguf_file(args.source, args.dest, args.dtype)
        for note in notes:
            print(note)
        print(f"wrote {args.dest} (GGUF, llama.cpp's GPT-2, {args.dtype}) and {modelfile_path(args.dest)} (Ollama, "
              f"num_ctx {context}). The model reads {context} positions, prompt and answer: llama-cli -m {args.dest} "
              f"-c {context} -n {context // 2} -p 'ROMEO:' (llama.cpp reads past the position table otherwise)")
        return
    print(f"wrote {export_gpt2(args.source, args.dest)} (GPT2LMHeadModel)")


if __name__ == "__main__":
    main()
