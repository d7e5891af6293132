#!/usr/bin/env python
"""Export a bidirlm checkpoint (or re-export an HF directory) as an HF directory transformers loads natively.

    python convert/bidirlm_to_hf.py ckpt/gemma3-270m out/gemma3-270m-hf [--attention bidirectional] [--dtype bfloat16]

Same as `bidirlm convert SRC DST --to hf`; see `bidirlm convert --help` for every option.
"""

import sys

from bidirlm_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:], "--to", "hf"]))
