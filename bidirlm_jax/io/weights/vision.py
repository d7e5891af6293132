"""The Qwen3-VL vision tower's weight table (the `visual` component) and the whole Qwen3-VL model's tables.

Every entry is a reshape, never a transpose: our parameters keep transformers' `[out, in]` order, with
the fused qkv split into (3, heads, head_dim) and the Conv3d patch kernel `[D, C, T, p, p]` flattened to
the `[D, C·T·p·p]` linear map it is on the processor's rows (kernel = stride; rows are C-major, as
transformers views them). Keys are relative to the tower's prefix (`visual.` in a `Qwen3VLModel`,
`model.visual.` in a `Qwen3VLForConditionalGeneration`; io.layouts finds it).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from bidirlm_jax.io.layouts import VISION, Layout, detect_layout
from bidirlm_jax.io.weights.load import TensorDict, load_state
from bidirlm_jax.io.weights.save import param_arrays
from bidirlm_jax.io.weights.table import Table, WeightEntry, entry
from bidirlm_jax.io.weights.text import text_tables
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.towers.qwen3_vl.config import Qwen3VLConfig, VisionConfig
from bidirlm_jax.models.towers.qwen3_vl.vision import VisionTower, relayout


def vision_table(config: VisionConfig) -> Table:
    """Every parameter of `VisionTower(config)` (unrolled), every declared DeepStack merger included."""
    d, f, h, hd = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim
    wide, out = d * config.merge_unit, config.out_hidden_size
    entries: list[WeightEntry] = []

    def dense(path, key, hf_out, hf_in, out_shape=None, in_shape=None):
        shape = (*(out_shape or (hf_out,)), *(in_shape or (hf_in,)))
        entries.append(entry((*path, "weight"), f"{key}.weight", (hf_out, hf_in), shape))
        entries.append(entry((*path, "bias"), f"{key}.bias", (hf_out,), out_shape))

    def norm(path, key, dim):
        entries.append(entry((*path, "weight"), f"{key}.weight", (dim,)))
        entries.append(entry((*path, "bias"), f"{key}.bias", (dim,)))

    def merger(path, key, norm_dim):
        norm((*path, "norm"), f"{key}.norm", norm_dim)
        dense((*path, "fc1"), f"{key}.linear_fc1", wide, wide)
        dense((*path, "fc2"), f"{key}.linear_fc2", out, wide)

    kernel = (d, config.in_channels, config.temporal_patch_size, config.patch_size, config.patch_size)
    entries.append(entry(("patch_embed", "weight"), "patch_embed.proj.weight", kernel, (d, config.patch_dim)))
    entries.append(entry(("patch_embed", "bias"), "patch_embed.proj.bias", (d,)))
    entries.append(entry(("pos_embed",), "pos_embed.weight", (config.num_position_embeddings, d)))
    for i in range(config.depth):
        block, key = ("layers", i), f"blocks.{i}"
        norm((*block, "norm1"), f"{key}.norm1", d)
        dense((*block, "attn", "qkv"), f"{key}.attn.qkv", 3 * d, d, out_shape=(3, h, hd))
        dense((*block, "attn", "proj"), f"{key}.attn.proj", d, d, in_shape=(h, hd))
        norm((*block, "norm2"), f"{key}.norm2", d)
        dense((*block, "fc1"), f"{key}.mlp.linear_fc1", f, d)
        dense((*block, "fc2"), f"{key}.mlp.linear_fc2", d, f)
    merger(("merger",), "merger", d)
    for k in range(len(config.deepstack_visual_indexes)):
        merger(("deepstack_mergers", k), f"deepstack_merger_list.{k}", wide)
    return Table(VISION, tuple(entries))


def qwen3_vl_tables(config: Qwen3VLConfig) -> tuple[Table, ...]:
    """What a `Qwen3VL` (unrolled) reads and writes: the text model's tables under `text`, the tower's under
    `visual`."""
    return (*(t.under("text") for t in text_tables(config.text)), vision_table(config.vision).under("visual"))


def vision_from_tensors(
    config: VisionConfig, tensors: Mapping[str, np.ndarray], runtime: Runtime = DEFAULT_RUNTIME
) -> VisionTower:
    """A `VisionTower` run as `runtime` says whose parameters are the tower's tensors of a transformers
    Qwen3-VL state dict."""
    unrolled = runtime.replace(scan_layers=False)
    abstract = nnx.split(nnx.eval_shape(lambda: VisionTower(config, unrolled, rngs=nnx.Rngs(0))))
    layout = detect_layout(tensors, [VISION])
    tower = load_state(abstract, TensorDict(tensors), layout, [vision_table(config)], dtype=runtime.param_dtype)
    return relayout(tower, runtime.scan_layers)


def vision_to_tensors(tower: VisionTower, prefix: str = "visual.") -> dict[str, np.ndarray]:
    """The tower's parameters under transformers' keys and shapes (every declared DeepStack merger included)."""
    tower = relayout(tower, False)
    arrays, layout = param_arrays(tower), Layout(((VISION, prefix),))
    return {
        layout.key(VISION, e.hf_key): e.to_hf(np.asarray(arrays[e.path])) for e in vision_table(tower.config).entries
    }
