"""Self-attention: projections, QK-norm and RoPE around a kernel call.

The mask never reaches this module as an array: the stack hands each layer an `attend(q, k, v)` closure
holding its layer type's `MaskSpec`, the call's `Segments` and the kernel settings (`models.masks`,
`kernels.attention`), so an unrolled layer and a scanned one differ only in the closure they get.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.layers import RMSNorm, apply_rope, linear, param

AttendFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (q [B,T,H,D], k, v [B,S,KV,D]) -> [B,T,H,D]


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.bias = config.attention_bias
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
        if self.bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(x.dtype)
        return y

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], attend: AttendFn) -> jax.Array:
        q = apply_rope(self.q_norm(self._project(x, "q")), *rope)
        k = apply_rope(self.k_norm(self._project(x, "k")), *rope)
        v = self._project(x, "v")
        y = linear(attend(q, k, v), self.o_proj, in_dims=2)
        if self.bias:
            y = y + self.o_bias[...].astype(x.dtype)
        return y
