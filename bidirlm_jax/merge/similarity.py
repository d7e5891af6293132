"""How close two models of one backbone are, layer by layer: the paper's measure of whether a merge will work
(§4 and F.2: Bi+MNTP against its base; §6: an encoder against a specialist, 0.97 / 0.97 / 0.93).

A layer's vector is every attention and MLP tensor of that layer flattened and concatenated (norms left out,
as the paper's "attention & MLP params of a layer"); its similarity is the cosine of the two models' vectors,
accumulated tensor by tensor in float64 so no layer is ever held whole. The backbones are matched by their
backbone-relative names (`io.layouts`, as `bidirlm merge` matches them), so a Qwen3-VL or Qwen3-ASR specialist
compares with a text encoder; a tensor one model lacks, or holds in another shape, is refused by name.
"""

from __future__ import annotations

import os
import re

import numpy as np

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.merge.linear import listing
from bidirlm_jax.merge.plan import index_input, open_input
from bidirlm_jax.merge.spec import MergeModel

_LAYER = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.")


def _layer_tensors(path: str | os.PathLike):
    inp = open_input(MergeModel(str(path), 1.0), allow_pickle=False)
    index_input(inp, ())
    tensors = {}
    for (kind, name), key in inp.names.items():
        if kind == "backbone" and (m := _LAYER.match(name)):
            tensors[name] = (int(m.group(1)), key)
    return inp.reader, tensors


def layer_cosine_similarity(a: str | os.PathLike, b: str | os.PathLike) -> dict[str, float | list[float]]:
    """`{"mean": …, "layers": [one cosine per layer]}` between the backbones of the checkpoints `a` and `b`
    (HF directories or training runs); `ConfigError` naming the tensors when the backbones differ."""
    reader_a, mine = _layer_tensors(a)
    reader_b, theirs = _layer_tensors(b)
    differ = [f"{n} (only in {a})" for n in sorted(mine.keys() - theirs.keys())]
    differ += [f"{n} (only in {b})" for n in sorted(theirs.keys() - mine.keys())]
    differ += [
        f"{n}: {reader_a.shape(mine[n][1])} in {a}, {reader_b.shape(theirs[n][1])} in {b}"
        for n in sorted(mine.keys() & theirs.keys())
        if reader_a.shape(mine[n][1]) != reader_b.shape(theirs[n][1])
    ]
    if differ:
        raise ConfigError(
            f"the backbones of {a} and {b} differ, so they do not share a pretrained backbone and cannot be "
            f"merged:{listing(differ)}"
        )
    if not mine:
        raise ConfigError(f"{a} holds no attention or MLP tensors under layers.N. to compare")
    layers = max(layer for layer, _ in mine.values()) + 1
    dot, norm_a, norm_b = np.zeros(layers), np.zeros(layers), np.zeros(layers)
    for name, (layer, key) in mine.items():
        x = reader_a.get(key).astype(np.float64).ravel()
        y = reader_b.get(theirs[name][1]).astype(np.float64).ravel()
        dot[layer] += x @ y
        norm_a[layer] += x @ x
        norm_b[layer] += y @ y
    denominator = np.sqrt(norm_a * norm_b)
    cosines = np.divide(dot, denominator, out=np.zeros(layers), where=denominator > 0)  # 0 for a zero layer
    return {"mean": float(np.mean(cosines)), "layers": [float(c) for c in cosines]}
