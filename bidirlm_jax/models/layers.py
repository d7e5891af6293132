"""Leaf layers with explicit arguments (no model config): parameters, RMSNorm, LayerNorm, embedding, MLP, linear.

Numerics follow transformers line by line (where each cast happens matters in bf16): Gemma3's norm
computes `x·rsqrt(mean x²+eps)·(1+w)` in fp32 and casts last, Qwen3's casts back before multiplying by
`w`; Gemma3 multiplies embeddings by √d rounded to the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bidirlm_jax.sharding import constrain

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], dtype: str, *, init: str = "normal") -> nnx.Param:
    """A parameter of `dtype` tagged with logical axis names (see `bidirlm_jax.sharding.LOGICAL_RULES`).

    Sharding is applied by whoever places the model on a mesh, so building a model never needs one.
    """
    dtype = jnp.dtype(dtype)
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "fan_in":  # [out, in, ...] kernels: unit-variance outputs for unit-variance inputs
        value = jax.random.normal(rngs.params(), shape, dtype) / math.sqrt(math.prod(shape[1:]))
    else:
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)  # transformers' initializer_range
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
    """`plus_one`: scale by (1 + w) in fp32, w stored with the 1 taken out (Gemma); else by w in x's dtype."""

    def __init__(self, dim: int, *, eps: float, plus_one: bool, param_dtype: str, rngs: nnx.Rngs):
        self.plus_one = plus_one
        self.eps = eps
        # Gemma stores w with the +1 taken out (zeros = identity); Qwen stores the scale itself.
        self.weight = param(rngs, (dim,), ("norm",), param_dtype, init="zeros" if plus_one else "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...]
        if self.plus_one:
            return (h * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return w.astype(x.dtype) * h.astype(x.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm: `(x − mean) · rsqrt(var + eps) · w + b`, statistics in fp32, cast back last.

    The vision and audio towers (Qwen3-VL's ViT, Qwen3-ASR's AuT) normalise this way; the text stack never does.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype: str, rngs: nnx.Rngs, axis: str = "norm"):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis,), param_dtype, init="ones")
        self.bias = param(rngs, (dim,), (axis,), param_dtype, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Embedder(nnx.Module):
    """Token embedding gathered into `dtype`, times `scale` (rounded to `dtype`) when one is given."""

    def __init__(self, vocab: int, dim: int, *, dtype: str, param_dtype: str, scale: float | None, rngs: nnx.Rngs):
        self.scale = scale
        self.dtype = jnp.dtype(dtype)
        self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        # Gather, then cast: the same values as casting the table first, without a [vocab, d] copy in the
        # compute dtype, and the gradient scatter-adds straight into the table's dtype. The table's `embed` side
        # is gathered first (as FSDP gathers any weight): a gather from a table split on `embed` gives rows split
        # on `embed`, which XLA can only bring to the batch-split layout by replicating them ("Involuntary full
        # rematerialization" on a mesh with both data and fsdp axes).
        table = constrain(self.embedding[...], ("vocab", None))
        x = jnp.take(table, input_ids, axis=0).astype(self.dtype)
        if self.scale is not None:
            x = x * jnp.asarray(self.scale, self.dtype)
        return x


LAYER_AXIS = "layers"  # logical name of a scanned stack's stacked parameters' leading axis (never sharded)
ADAPTER_SUFFIX = "_lora"  # `q_proj_lora` beside `q_proj`: a low-rank adapter of it (`models.lora`)


def adapter_of(module: nnx.Module, name: str) -> Callable[[jax.Array], jax.Array] | None:
    """The adapter `models.lora.add_adapters` attached to `module`'s weight `name`, if any."""
    return getattr(module, name + ADAPTER_SUFFIX, None)


def linear(
    x: jax.Array, w: nnx.Param, *, in_dims: int = 1, adapter: Callable[[jax.Array], jax.Array] | None = None, **kwargs
) -> jax.Array:
    """x @ Wᵀ for W stored [*out, *in] as transformers stores it (conversion is then a reshape, never a
    transpose); the last `in_dims` axes of x are contracted. Run as one 2-D matmul: XLA's CPU backend
    is markedly slower on batched [B, T, d] dots once an elementwise backward fuses into them.
    `adapter(x)` (a LoRA update, `adapter_of`) is added to the product, cast to its dtype."""
    wv = w[...].astype(x.dtype)
    lead, out = x.shape[: x.ndim - in_dims], wv.shape[: wv.ndim - in_dims]
    k = math.prod(x.shape[x.ndim - in_dims :])
    y = jnp.dot(x.reshape(-1, k), wv.reshape(-1, k).T, **kwargs).reshape(*lead, *out)
    return y if adapter is None else y + adapter(x).astype(y.dtype)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), `activation` one of `ACTIVATIONS`."""

    def __init__(self, dim: int, hidden: int, *, activation: str, param_dtype: str, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[activation]
        self.gate_proj = param(rngs, (hidden, dim), ("mlp", "embed"), param_dtype)
        self.up_proj = param(rngs, (hidden, dim), ("mlp", "embed"), param_dtype)
        self.down_proj = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = linear(x, self.gate_proj, adapter=adapter_of(self, "gate_proj"))
        up = linear(x, self.up_proj, adapter=adapter_of(self, "up_proj"))
        return linear(self.act(gate) * up, self.down_proj, adapter=adapter_of(self, "down_proj"))
