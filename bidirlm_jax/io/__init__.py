"""Reading and writing checkpoints: safetensors shards, HF directories, atomic outputs."""

FORMATS = ("hf", "checkpoint")  # what `convert` reads and writes: HF directories, bidirlm (orbax) checkpoints
