#!/usr/bin/env python
"""Convert a Hugging Face Gemma3/Qwen3 directory (downloaded by you) into a bidirlm checkpoint.

    python convert/hf_to_bidirlm.py ~/models/gemma-3-270m ckpt/gemma3-270m [--attention bidirectional]

Same as `bidirlm convert SRC DST`; see `bidirlm convert --help` for every option.
"""

import sys

from bidirlm_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:], "--to", "checkpoint"]))
