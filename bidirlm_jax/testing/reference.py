"""transformers' PyTorch models as the reference: tiny random ones built from configs, never downloaded.

Used by the parity tests and `bidirlm demo`; needs the optional torch/transformers dependencies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from flax import nnx

VOCAB = 512
WINDOW = 8  # sliding window; test sequences are 24 tokens, three windows long


def gemma3_config(**overrides) -> transformers.Gemma3TextConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        max_position_embeddings=512,
        sliding_window_pattern=2,
        attn_implementation="eager",
    )
    kw.update(overrides)
    return transformers.Gemma3TextConfig(**kw)


def qwen3_config(**overrides) -> transformers.Qwen3Config:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    kw.update(overrides)
    return transformers.Qwen3Config(**kw)


def build(config, seed: int = 0) -> transformers.PreTrainedModel:
    """A random causal LM whose norm weights are perturbed too (init leaves them at identity)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save(model, path: Path, dtype: torch.dtype | None = None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return path


def batch(seed: int = 0, *, batch: int = 3, length: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a mask with a right-padded row, a left-padded row and a full row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[0, -7:] = 0  # right padding
    mask[1, :5] = 0  # left padding
    return ids, mask


def hf_logits(model, ids: np.ndarray, mask: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **kwargs)
    return out.logits.float().numpy()


def max_rel_err(ours, theirs, mask: np.ndarray) -> float:
    """Largest difference over real (unpadded) tokens, relative to the largest reference logit."""
    valid = mask.astype(bool)
    ours, theirs = np.asarray(ours, np.float32)[valid], np.asarray(theirs, np.float32)[valid]
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@nnx.jit
def logits(model, ids, mask):
    """Our model's logits, compiled once per model and shape (the parity tests' forward)."""
    return model(ids, mask).logits
