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
from bidirlm_jax.models.layers import RMSNorm, linear, param
from bidirlm_jax.models.positions import apply_rope

AttendFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (q [B,T,H,D], k, v [B,S,KV,D]) -> [B,T,H,D]


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        dtype = config.param_dtype
        self.bias = config.attention_bias
        # [out..., in] like transformers' Linear, with heads split out so they can be sharded.
        self.q_proj = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dtype)
        self.k_proj = param(rngs, (kv, hd, d), ("kv_heads", "head_dim", "embed"), dtype)
        self.v_proj = param(rngs, (kv, hd, d), ("kv_heads", "head_dim", "embed"), dtype)
        self.o_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dtype)
        if config.attention_bias:
            self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), dtype, init="zeros")
            self.k_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.v_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.o_bias = param(rngs, (d,), ("embed",), dtype, init="zeros")
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            norm = dict(eps=config.rms_norm_eps, plus_one=config.norm_plus_one, param_dtype=dtype, rngs=rngs)
            self.q_norm = RMSNorm(hd, **norm)
            self.k_norm = RMSNorm(hd, **norm)

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        y = linear(x, getattr(self, f"{name}_proj"))
        if self.bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(x.dtype)
        return y

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], attend: AttendFn) -> jax.Array:
        q, k = self._project(x, "q"), self._project(x, "k")
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        v = self._project(x, "v")
        y = linear(attend(q, k, v), self.o_proj, in_dims=2)
        if self.bias:
            y = y + self.o_bias[...].astype(x.dtype)
        return y
