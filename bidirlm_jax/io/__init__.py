"""Reading and writing checkpoints: safetensors shards, HF directories, atomic outputs."""

FORMATS = ("hf", "checkpoint")  # what `convert` reads and writes: HF directories, bidirlm (orbax) checkpoints
EXPORT_FORMATS = ("transformers", "bidirlm")  # HF outputs: transformers' own classes, or BidirLM's released format
