"""Self-attention: the masks that make a decoder causal or bidirectional, and the kernel dispatch.

Masks are boolean `[B, 1, T, T]` (True = may attend), built once per forward for each layer type:

- padding: keys where `attention_mask == 0` are never attended;
- packing: with `segment_ids`, tokens only see their own segment (in both modes);
- causal: key index ≤ query index; a causal sliding layer also needs `i - j < W` (transformers);
- bidirectional sliding layers, by `bidirectional_window`:
  `"half"` |i−j| ≤ W//2 (transformers' `Gemma3TextConfig(use_bidirectional_attention=True)`),
  `"full"` |i−j| ≤ W (transformers' generic `is_causal=False`), `"none"` no window.

`attend` is the one place that picks the implementation: cuDNN flash attention on GPU in half
precision, a blocked kernel on CPU, XLA's `jax.nn.dot_product_attention` otherwise, and the plain
einsum reference when asked for.
There is no attention-logit soft-capping: transformers' Gemma3 keeps `attn_logit_softcapping` in its
config but never applies it (QK-norm replaced it), and parity is the law.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bidirlm_jax.models.config import SLIDING, ModelConfig
from bidirlm_jax.models.layers import RMSNorm, apply_rope, linear, param


def build_masks(config: ModelConfig, attention_mask: jax.Array, segment_ids: jax.Array | None) -> dict[str, jax.Array]:
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


def _softmax_attention(q, k, v, mask, scale: float) -> jax.Array:
    """q [..., G, T, D], k/v [..., S, D], mask [..., T, S] -> [..., G, T, D]; fp32 softmax as transformers'."""
    logits = jnp.einsum("...gtd,...sd->...gts", q, k).astype(jnp.float32) * scale
    logits = jnp.where(mask[..., None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...gts,...sd->...gtd", probs, v)


def _heads_first(q, k, v):
    """[B, T, H, D] -> q [B, KV, G, T, D] and k/v [B, KV, S, D] (G query heads share each KV head)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _heads_last(out: jax.Array) -> jax.Array:
    b, kv, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)


def reference_attention(q, k, v, mask, *, scale: float) -> jax.Array:
    """Plain softmax attention with GQA over [B, T, H, D]: the function every kernel must compute."""
    q, k, v = _heads_first(q, k, v)
    return _heads_last(_softmax_attention(q, k, v, mask, scale))  # mask [B, 1, T, S] broadcasts over KV heads


def blocked_attention(q, k, v, mask, *, scale: float) -> jax.Array:
    """The reference, one (sequence, KV head) at a time, each block recomputed in the backward pass.

    XLA's CPU backend neither fuses nor tiles attention: the [T, S] scores of a whole batch stream
    through memory three times, while one head's stay in cache (3x faster forward, 15% faster backward
    than `jax.nn.dot_product_attention` at 8 x 512 tokens).
    """
    q, k, v = _heads_first(q, k, v)
    b, kv = k.shape[:2]
    flat = lambda x: x.reshape(b * kv, *x.shape[2:])

    def block(args):
        i, qb, kb, vb = args
        return _softmax_attention(qb, kb, vb, mask[i // kv, 0], scale)

    out = jax.lax.map(jax.checkpoint(block), (jnp.arange(b * kv), flat(q), flat(k), flat(v)))
    return _heads_last(out.reshape(b, kv, *out.shape[1:]))


def attend(q, k, v, mask, *, scale: float, implementation: str) -> jax.Array:
    """Dispatch to a kernel; all of them compute the same function (tests hold them to it).

    "auto": cuDNN on GPU in half precision; on a one-device CPU computation the blocked kernel; XLA's
    fused-by-the-compiler `jax.nn.dot_product_attention` otherwise (a scan over a sharded batch would
    make the partitioner gather it).
    """
    if implementation == "reference":
        return reference_attention(q, k, v, mask, scale=scale)
    if implementation == "blocked":
        return blocked_attention(q, k, v, mask, scale=scale)
    if implementation == "auto":
        backend = jax.default_backend()
        if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            try:  # cuDNN flash attention; the mask becomes an additive bias
                return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
            except NotImplementedError:  # shapes cuDNN refuses (e.g. head_dim 256 before Hopper)
                pass
        mesh = jax.sharding.get_abstract_mesh()
        if backend == "cpu" and (mesh.empty or mesh.size == 1):
            return blocked_attention(q, k, v, mask, scale=scale)
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
        y = linear(x, getattr(self, f"{name}_proj"))
        if self.config.attention_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(x.dtype)
        return y

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array) -> jax.Array:
        q = apply_rope(self.q_norm(self._project(x, "q")), *rope)
        k = apply_rope(self.k_norm(self._project(x, "k")), *rope)
        v = self._project(x, "v")
        out = attend(q, k, v, mask, scale=self.config.attention_scale, implementation=self.config.attention_impl)
        y = linear(out, self.o_proj, in_dims=2)
        if self.config.attention_bias:
            y = y + self.o_bias[...].astype(x.dtype)
        return y
