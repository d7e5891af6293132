"""Self-attention: the masks that make a decoder causal or bidirectional, and the kernel dispatch.

Masks are boolean `[B, 1, T, T]` (True = may attend), built once per forward for each layer type:

- padding: keys where `attention_mask == 0` are never attended;
- packing: with `segment_ids`, tokens only see their own segment (in both modes);
- causal: key index ≤ query index; a causal sliding layer also needs `i - j < W` (transformers);
- bidirectional sliding layers, by `bidirectional_window`:
  `"half"` |i−j| ≤ W//2 (transformers' `Gemma3TextConfig(use_bidirectional_attention=True)`),
  `"full"` |i−j| ≤ W (transformers' generic `is_causal=False`), `"none"` no window.

`attend` is the one place that picks the implementation: cuDNN flash attention on GPU in half
precision, XLA's `jax.nn.dot_product_attention` otherwise, the plain einsum reference when asked for.
There is no attention-logit soft-capping: transformers' Gemma3 keeps `attn_logit_softcapping` in its
config but never applies it (QK-norm replaced it), and parity is the law.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bidirlm_jax.models.config import SLIDING, ModelConfig
from bidirlm_jax.models.layers import RMSNorm, apply_rope, param


def build_masks(
    config: ModelConfig, attention_mask: jax.Array, segment_ids: jax.Array | None
) -> dict[str, jax.Array]:
    """The `[B, 1, T, T]` mask of each layer type present in the model."""
    t = attention_mask.shape[1]
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    valid = attention_mask.astype(bool)
    base = valid[:, None, None, :]
    if segment_ids is not None:
        base = base & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    causal = config.attention == "causal"
    if causal:
        base = base & (j <= i)
    masks = {}
    for layer_type in set(config.layer_types):
        mask = base
        if layer_type == SLIDING:
            mask = mask & _window(config, i, j)
        # A padding query with nothing to attend to (left padding, causal) attends to itself, so the
        # softmax stays finite; its output is padding and never read.
        masks[layer_type] = mask | ((i == j) & ~valid[:, None, :, None])
    return masks


def _window(config: ModelConfig, i: jax.Array, j: jax.Array) -> jax.Array:
    w = config.sliding_window
    if config.attention == "causal":
        return i - j < w
    if config.bidirectional_window == "half":
        return jnp.abs(i - j) <= w // 2
    if config.bidirectional_window == "full":
        return jnp.abs(i - j) <= w
    return jnp.ones_like(i - j, dtype=bool)


def reference_attention(q, k, v, mask, *, scale: float) -> jax.Array:
    """Plain softmax attention with GQA, [B, T, H, D] layout; fp32 softmax as transformers' eager path."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * scale
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def attend(q, k, v, mask, *, scale: float, implementation: str) -> jax.Array:
    """Dispatch to a kernel; all of them compute the same function (tests hold them to it)."""
    if implementation == "reference":
        return reference_attention(q, k, v, mask, scale=scale)
    if implementation == "auto":
        if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            try:  # cuDNN flash attention; the mask becomes an additive bias
                return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
            except NotImplementedError:  # shapes cuDNN refuses (e.g. head_dim 256 before Hopper)
                pass
        implementation = "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.config = config
        # [out..., in] like transformers' Linear, with heads split out so they can be sharded.
        self.q_proj = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), config)
        self.k_proj = param(rngs, (kv, hd, d), ("kv_heads", "head_dim", "embed"), config)
        self.v_proj = param(rngs, (kv, hd, d), ("kv_heads", "head_dim", "embed"), config)
        self.o_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), config)
        if config.attention_bias:
            self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), config, init="zeros")
            self.k_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), config, init="zeros")
            self.v_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), config, init="zeros")
            self.o_bias = param(rngs, (d,), ("embed",), config, init="zeros")
        self.q_norm = RMSNorm(hd, config, rngs=rngs)
        self.k_norm = RMSNorm(hd, config, rngs=rngs)

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        y = jnp.einsum("btd,hkd->bthk", x, getattr(self, f"{name}_proj")[...].astype(x.dtype))
        if self.config.attention_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(x.dtype)
        return y

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array) -> jax.Array:
        q = apply_rope(self.q_norm(self._project(x, "q")), *rope)
        k = apply_rope(self.k_norm(self._project(x, "k")), *rope)
        v = self._project(x, "v")
        out = attend(q, k, v, mask, scale=self.config.attention_scale, implementation=self.config.attention_impl)
        y = jnp.einsum("bthk,dhk->btd", out, self.o_proj[...].astype(x.dtype))
        if self.config.attention_bias:
            y = y + self.o_bias[...].astype(x.dtype)
        return y
