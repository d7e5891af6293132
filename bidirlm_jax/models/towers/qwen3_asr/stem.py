"""The AuT conv stem: mel chunks → one token per 8 frames, with chunk-local sinusoidal positions.

Each chunk of `2·n_window` frames goes through three Conv2d (3×3, stride 2, padding 1) each followed by
exact GELU, over (frequency, time); channels × frequency are then flattened (channel-major) and
projected to `d_model` without bias, and the sinusoids of positions 0..c−1 are added.

Boundary semantics of the released model, which runs one clip at a time: a clip of one chunk is
convolved unpadded, so its convolutions see zeros right after its last frame at every stage; the tail
chunk of a longer clip is zero-padded to `2·n_window` frames and convolved as is, so its later stages see
GELU(bias) past the tail. With static shapes every chunk is padded; re-masking the time axis after each
stage (`len ← ⌊(len−1)/2⌋+1`) for single-chunk clips only reproduces both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bidirlm_jax.models.layers import linear, param
from bidirlm_jax.models.towers.qwen3_asr.config import AudioConfig

MAX_TIMESCALE = 10000


def sinusoids(length: int, channels: int) -> np.ndarray:
    """[length, channels] fp32 `[sin(p·τ_i) | cos(p·τ_i)]`, τ_i = exp(−i·ln(10⁴)/(channels/2 − 1)), computed
    in fp32 in transformers' order (a host constant)."""
    half = channels // 2
    step = np.float32(np.log(MAX_TIMESCALE) / (half - 1))
    inv = np.exp(-step * np.arange(half, dtype=np.float32))
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class Conv(nnx.Module):
    """A 3×3, stride-2, padding-1 Conv2d over channels-last `[N, H, W, C]`, holding torch's OIHW kernel.

    Run as nine matmuls, one per kernel tap, over strided views of the padded input: XLA's CPU
    convolution ran this stem at about a third of its 2048³ matmul rate, the taps run it at about half
    (BENCHMARKS.md, the AuT tower). The sum order differs from one convolution's by fp32 rounding only.
    """

    def __init__(self, cin: int, cout: int, *, param_dtype: str, rngs: nnx.Rngs):
        # fan-in scaled at random init (torch's own Conv2d scale): at 0.02 the stem's output is ~1e-3 and the
        # sinusoidal positions added after it drown every clip's features, so a fresh tower sees no audio
        self.weight = param(rngs, (cout, cin, 3, 3), ("conv", None, None, None), param_dtype, init="fan_in")
        self.bias = param(rngs, (cout,), ("conv",), param_dtype, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        _, h, w, _ = x.shape
        ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        kernel = self.weight[...].astype(x.dtype)
        y = self.bias[...].astype(x.dtype)
        for i in range(3):
            for j in range(3):
                view = padded[:, i : i + 2 * ho - 1 : 2, j : j + 2 * wo - 1 : 2, :]
                y = y + jnp.einsum("nhwc,oc->nhwo", view, kernel[:, :, i, j])
        return y


def chunk_lengths(lengths: jax.Array, chunks: int, chunk_frames: int) -> jax.Array:
    """[B, chunks] frames of each chunk of clips of `lengths` [B] frames (0 past the clip)."""
    start = jnp.arange(chunks, dtype=jnp.int32) * chunk_frames
    return jnp.clip(lengths[:, None] - start[None, :], 0, chunk_frames)


class ConvStem(nnx.Module):
    """`(mel [N, mel_bins, 2·n_window], remask [N]) -> [N, c, d_model]`: chunks to tokens, positions added.

    `remask[i]` is the frame count of chunk i when it is a whole clip (re-masked after every stage), and
    `2·n_window` (a no-op) otherwise.
    """

    def __init__(self, config: AudioConfig, dtype: str, *, rngs: nnx.Rngs):
        ch = config.downsample_hidden_size
        self.conv2d1 = Conv(1, ch, param_dtype=dtype, rngs=rngs)
        self.conv2d2 = Conv(ch, ch, param_dtype=dtype, rngs=rngs)
        self.conv2d3 = Conv(ch, ch, param_dtype=dtype, rngs=rngs)
        shape = (config.d_model, ch, config.stem_features // ch)
        self.conv_out = param(rngs, shape, ("embed", "conv", None), dtype, init="fan_in")  # as the convolutions

    def __call__(self, mel: jax.Array, remask: jax.Array) -> jax.Array:
        x = mel[..., None]  # [N, F, T, 1]: frequency × time, channels last
        length = remask
        for conv in (self.conv2d1, self.conv2d2, self.conv2d3):
            x = jax.nn.gelu(conv(x), approximate=False)
            length = (length - 1) // 2 + 1
            keep = jnp.arange(x.shape[2])[None, :] < length[:, None]  # [N, T']
            x = jnp.where(keep[:, None, :, None], x, 0)
        x = x.transpose(0, 2, 3, 1)  # [N, T', channels, F']: feature index = channel·F' + f
        x = linear(x, self.conv_out, in_dims=2)
        return x + jnp.asarray(sinusoids(x.shape[1], x.shape[2]), x.dtype)[None]  # a constant, not a weight
