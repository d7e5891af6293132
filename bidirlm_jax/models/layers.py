"""Building blocks shared by every decoder family: parameters, RMSNorm, embedding, MLP, RoPE.

Numerics follow transformers line by line (where each cast happens matters in bf16): Gemma3's norm
computes `x·rsqrt(mean x²+eps)·(1+w)` in fp32 and casts last, Qwen3's casts back before multiplying by
`w`; Gemma3 multiplies embeddings by √d rounded to the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bidirlm_jax.models.config import ModelConfig, Rope

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


def param(
    rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], config: ModelConfig, *, init: str = "normal"
) -> nnx.Param:
    """A parameter tagged with logical axis names (see `bidirlm_jax.sharding.LOGICAL_RULES`).

    Sharding is applied by whoever places the model on a mesh, so building a model never needs one.
    """
    dtype = jnp.dtype(config.param_dtype)
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)  # transformers' initializer_range
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, config: ModelConfig, *, rngs: nnx.Rngs):
        self.plus_one = config.is_gemma
        self.eps = config.rms_norm_eps
        # Gemma stores w with the +1 taken out (zeros = identity); Qwen stores the scale itself.
        self.weight = param(rngs, (dim,), ("norm",), config, init="zeros" if self.plus_one else "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        if self.plus_one:
            return (h * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return w.astype(x.dtype) * h.astype(x.dtype)


class Embedder(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = config.hidden_size**0.5 if config.is_gemma else None
        self.dtype = jnp.dtype(config.dtype)
        self.embedding = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), config)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        # Gather, then cast: the same values as casting the table first, without a [vocab, d] copy in the
        # compute dtype, and the gradient scatter-adds straight into the table's dtype.
        x = jnp.take(self.embedding[...], input_ids, axis=0).astype(self.dtype)
        if self.scale is not None:
            x = x * jnp.asarray(self.scale, self.dtype)
        return x


def linear(x: jax.Array, w: nnx.Param, *, in_dims: int = 1, **kwargs) -> jax.Array:
    """x @ Wᵀ for W stored [*out, *in] as transformers stores it (conversion is then a reshape, never a
    transpose); the last `in_dims` axes of x are contracted. Run as one 2-D matmul: XLA's CPU backend
    is markedly slower on batched [B, T, d] dots once an elementwise backward fuses into them."""
    w = w[...].astype(x.dtype)
    lead, out = x.shape[: x.ndim - in_dims], w.shape[: w.ndim - in_dims]
    k = math.prod(x.shape[x.ndim - in_dims :])
    y = jnp.dot(x.reshape(-1, k), w.reshape(-1, k).T, **kwargs)
    return y.reshape(*lead, *out)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.act = _ACTIVATIONS[config.activation]
        self.gate_proj = param(rngs, (f, d), ("mlp", "embed"), config)
        self.up_proj = param(rngs, (f, d), ("mlp", "embed"), config)
        self.down_proj = param(rngs, (d, f), ("embed", "mlp"), config)

    def __call__(self, x: jax.Array) -> jax.Array:
        return linear(self.act(linear(x, self.gate_proj)) * linear(x, self.up_proj), self.down_proj)


def rope_tables(positions: jax.Array, rope: Rope, head_dim: int, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [B, T, head_dim] for integer `positions` [B, T] (linear scaling divides freqs)."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    inv_freq = jnp.asarray(inv_freq / np.float32(rope.factor), jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, T, heads, head_dim] (the layout transformers' checkpoints expect)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
