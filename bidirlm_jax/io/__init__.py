"""Reading and writing checkpoints: safetensors shards, HF directories, atomic outputs."""
