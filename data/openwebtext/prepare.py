"""nanoGPT's data/openwebtext/prepare.py: OpenWebText (or any dataset / local files via --dataset / --files),
test_size 0.0005 seed 2357, GPT-2 BPE + EOT per document, memmap bins. Needs the network (or a datasets cache).

Run: python data/openwebtext/prepare.py [--help for options]
"""

import os
import sys

from nanogpt_hf.prepare import main

if __name__ == "__main__":
    main(sys.argv[1:], default_recipe="documents", default_dataset="openwebtext", default_out_dir=os.path.dirname(os.path.abspath(__file__)))
