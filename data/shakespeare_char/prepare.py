"""nanoGPT's data/shakespeare_char/prepare.py: Tiny Shakespeare (shipped with nanogpt_hf, downloaded if missing) -> train.bin, val.bin, meta.json.

Run: python data/shakespeare_char/prepare.py [--help for options]
"""

import os
import sys

from nanogpt_hf.prepare import main

if __name__ == "__main__":
    main(sys.argv[1:], default_recipe="shakespeare_char", default_out_dir=os.path.dirname(os.path.abspath(__file__)))
