"""Causal language modelling (next-token prediction): continued pre-training of a decoder.

    bidirlm train --config configs/lm.py:tiny --workdir /tmp/lm
    bidirlm train --config configs/lm.py:qwen3-0.6b --workdir /mnt/runs/q06 \
        --config.model.init_from=/ckpt/Qwen3-0.6B --config.data.path=tokens.npy

Presets: `tiny` (a 2-layer Qwen3 on a generated Markov corpus; learns visibly in seconds on a CPU),
`bench` (the 41.6M benchmark model, synthetic data), and the published sizes `gemma3-270m`,
`gemma3-1b`, `qwen3-0.6b`, `qwen3-1.7b` at the paper's recipe (AdamW, WSD, grad-norm 1.0, 8192-token
sequences, 288 × 8192 ≈ 2.36M tokens per step in 3 micro-batches, 10B tokens, seed 42; bf16 compute,
fp32 master weights, FSDP over all devices) on a `.npy` array of token ids (`data.path`).
"""

from ml_collections import ConfigDict

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.train.config import base_config

# Peak learning rates of the paper's MNTP runs (paper-recipe.md §2.4), a sound start for this objective too.
_SIZES = {"gemma3-270m": 5e-4, "qwen3-0.6b": 1e-4, "gemma3-1b": 7e-5, "qwen3-1.7b": 5e-5}
PRESETS = ("tiny", "bench", *_SIZES)


def get_config(preset: str = "tiny") -> ConfigDict:
    c = base_config()
    c.objective = "causal_lm"
    if preset == "tiny":
        c.model.preset = "tiny-qwen3"
        c.data.update(source="synthetic", seq_len=64, global_batch_size=16, synthetic_tokens=100_000)
        c.optim.update(learning_rate=3e-3, warmup_steps=10, weight_decay=0.0)
        c.train.update(steps=60, checkpoint_every=20, log_every=5)
    elif preset == "bench":
        c.model.preset = "bench-qwen3"
        c.data.update(source="synthetic", seq_len=512, global_batch_size=4, synthetic_tokens=400_000)
        c.train.update(steps=20, checkpoint_every=1000, log_every=1)
    elif preset in _SIZES:
        c.model.update(preset=preset, dtype="bfloat16", remat="save_dots")
        c.data.update(source="npy", seq_len=8192, global_batch_size=288)
        c.optim.update(learning_rate=_SIZES[preset], warmup_steps=42, decay_fraction=0.1)
        c.train.update(steps=4240, seed=42, grad_accum_steps=3, checkpoint_every=250, log_every=10)
        c.mesh.update(data=1, fsdp=-1, tensor=1)
    else:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return c
