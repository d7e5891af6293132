"""Attention inputs and the outputs-and-gradients probe shared by the kernel tests (XLA, splash, GPU)."""

import jax
import jax.numpy as jnp
import numpy as np

from bidirlm_jax.kernels.attention import attend
from bidirlm_jax.kernels.masks import Segments


def qkv(dtype=jnp.float32, t=32, b=2, heads=4, kv_heads=2, d=16):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (b, t, heads, d), dtype)
    return q, jax.random.normal(kk, (b, t, kv_heads, d), dtype), jax.random.normal(kv, (b, t, kv_heads, d), dtype)


def outputs_and_grads(impl, q, k, v, spec, segments, **kw):
    """Attention output and d(real rows' weighted sum)/d(q, k, v): padding rows are never read."""
    weights = jax.random.normal(jax.random.PRNGKey(1), q.shape) * segments.valid[:, :, None, None]

    def loss(q, k, v):
        out = attend(q, k, v, spec, segments, scale=0.25, implementation=impl, **kw)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out)[np.asarray(segments.valid)], [np.asarray(g) for g in grads]


def padded_segments(kind: str, t: int) -> Segments:
    """Row 0 right-padded, row 1 left-padded (both across a block boundary); "packed": two documents each."""
    mask = np.ones((2, t), np.int32)
    ids = None
    right, left = t // 7, t // 4 + 6
    if kind in ("padded", "packed"):
        mask[0, -right:] = 0
        mask[1, :left] = 0
    if kind == "packed":
        ids = np.zeros((2, t), np.int32)
        ids[0, : 2 * t // 5], ids[0, 2 * t // 5 : -right] = 1, 2
        ids[1, left : 3 * t // 5], ids[1, 3 * t // 5 :] = 1, 2
    return Segments.of(None if kind == "none" else mask, ids, (2, t))
