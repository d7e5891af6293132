"""Self-attention: projections, QK-norm and RoPE around a kernel call, from explicit arguments.

`Attention` takes its dimensions and options, not a model config, so the text stack and the vision and
audio towers build it alike. The mask never reaches this module as an array: the caller hands each
call an `attend(q, k, v, scale)` closure holding the layer's `MaskSpec`, the call's `Segments` and the
kernel settings (`models.masks`, `kernels.attention`), so an unrolled layer and a scanned one differ only
in the closure they get.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from bidirlm_jax.models.layers import RMSNorm, adapter_of, linear, param
from bidirlm_jax.models.positions import apply_rope

# (q [B,T,H,D], k, v [B,S,KV,D], scale) -> [B,T,H,D]
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]


class Attention(nnx.Module):
    """Multi-head (grouped-query) attention of `dim`-wide inputs.

    `bias`: biases on the q/k/v/o projections; `qk_norm`: an RMSNorm over `head_dim` on queries and keys
    before RoPE (`norm_eps`, `norm_plus_one` as `RMSNorm`'s); `scale`: the softmax scale (default
    `head_dim ** -0.5`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        param_dtype: str,
        rngs: nnx.Rngs,
        bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        norm_plus_one: bool = False,
        scale: float | None = None,
    ):
        d, h, kv, hd, dtype = dim, num_heads, num_kv_heads, head_dim, param_dtype
        self.bias = bias
        self.scale = float(head_dim) ** -0.5 if scale is None else scale
        # [out..., in] like transformers' Linear, with heads split out so they can be sharded.
        self.q_proj = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), dtype)
        self.k_proj = param(rngs, (kv, hd, d), ("kv_heads", "head_dim", "embed"), dtype)
        self.v_proj = param(rngs, (kv, hd, d), ("kv_heads", "head_dim", "embed"), dtype)
        self.o_proj = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), dtype)
        if bias:
            self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), dtype, init="zeros")
            self.k_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.v_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.o_bias = param(rngs, (d,), ("embed",), dtype, init="zeros")
        self.qk_norm = qk_norm
        if qk_norm:
            norm = dict(eps=norm_eps, plus_one=norm_plus_one, param_dtype=dtype, rngs=rngs)
            self.q_norm = RMSNorm(hd, **norm)
            self.k_norm = RMSNorm(hd, **norm)

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        y = linear(x, getattr(self, f"{name}_proj"), adapter=adapter_of(self, f"{name}_proj"))
        if self.bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(x.dtype)
        return y

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None, attend: AttendFn) -> jax.Array:
        """`rope`: cos/sin tables [B, T, head_dim], or None for a stack without rotary positions."""
        q, k = self._project(x, "q"), self._project(x, "k")
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        v = self._project(x, "v")
        y = linear(attend(q, k, v, self.scale), self.o_proj, in_dims=2, adapter=adapter_of(self, "o_proj"))
        if self.bias:
            y = y + self.o_bias[...].astype(x.dtype)
        return y
