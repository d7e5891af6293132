"""Qwen3-VL key tables (`visual.*` ↔ the tower's parameters; with the text table, the whole model) and
loading a module from a state dict's tensors.

Every entry is a reshape, never a transpose: our parameters keep transformers' `[out, in]` order, with
the fused qkv split into (3, heads, head_dim) and the Conv3d patch kernel `[D, C, T, p, p]` flattened to
the `[D, C·T·p·p]` linear map it is on the processor's rows (kernel = stride; rows are C-major, as
transformers views them). Keys are relative to the tower's prefix (`visual.` in a `Qwen3VLModel`,
`model.visual.` in a `Qwen3VLForConditionalGeneration`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.io.layouts import LM_HEAD
from bidirlm_jax.io.weights.table import WeightEntry
from bidirlm_jax.io.weights.text import weight_table
from bidirlm_jax.models import transformer
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.towers.qwen3_vl.config import Qwen3VLConfig, VisionConfig
from bidirlm_jax.models.towers.qwen3_vl.model import Qwen3VL
from bidirlm_jax.models.towers.qwen3_vl.vision import VisionTower, relayout


def vision_weight_table(config: VisionConfig) -> list[WeightEntry]:
    """Every parameter of `VisionTower(config)` (unrolled) with its transformers key and shapes."""
    d, f, h, hd = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim
    wide, out = d * config.merge_unit, config.out_hidden_size
    entries: list[WeightEntry] = []

    def add(path, key, hf_shape, shape=None):
        entries.append(WeightEntry(tuple(path), key, tuple(hf_shape), tuple(shape or hf_shape)))

    def dense(path, key, hf_out, hf_in, out_shape=None, in_shape=None):
        add((*path, "weight"), f"{key}.weight", (hf_out, hf_in), (*(out_shape or (hf_out,)), *(in_shape or (hf_in,))))
        add((*path, "bias"), f"{key}.bias", (hf_out,), out_shape)

    def norm(path, key, dim):
        add((*path, "weight"), f"{key}.weight", (dim,))
        add((*path, "bias"), f"{key}.bias", (dim,))

    def merger(path, key, norm_dim):
        norm((*path, "norm"), f"{key}.norm", norm_dim)
        dense((*path, "fc1"), f"{key}.linear_fc1", wide, wide)
        dense((*path, "fc2"), f"{key}.linear_fc2", out, wide)

    kernel = (d, config.in_channels, config.temporal_patch_size, config.patch_size, config.patch_size)
    add(("patch_embed", "weight"), "patch_embed.proj.weight", kernel, (d, config.patch_dim))
    add(("patch_embed", "bias"), "patch_embed.proj.bias", (d,))
    add(("pos_embed",), "pos_embed.weight", (config.num_position_embeddings, d))
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
    return entries


def load_table(abstract: nnx.Module, table: list[WeightEntry], tensors: Mapping[str, np.ndarray], prefix: str = ""):
    """`abstract` (from `nnx.eval_shape`) with every parameter of `table` read from `tensors[prefix + key]`
    (numpy or torch-converted arrays), shapes checked; the tensors under `prefix` must be exactly the table's."""
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    wanted = {prefix + e.hf_key for e in table}
    present = {k for k in tensors if k.startswith(prefix)}
    missing, unknown = sorted(wanted - present), sorted(present - wanted)
    if missing or unknown or len(table) != len(flat):
        raise CheckpointError(
            f"tensors under {prefix!r} do not match the model: missing {missing[:8]}, unexpected {unknown[:8]} "
            "— check that the config belongs to these weights"
        )
    for entry in table:
        array = np.asarray(tensors[prefix + entry.hf_key])
        if array.shape != entry.hf_shape:
            raise CheckpointError(f"{prefix}{entry.hf_key}: shape {array.shape}, the config needs {entry.hf_shape}")
        var = flat[entry.path]
        flat[entry.path] = var.replace(jnp.asarray(entry.to_ours(array), var.get_value().dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def vision_from_tensors(
    config: VisionConfig,
    tensors: Mapping[str, np.ndarray],
    prefix: str = "visual.",
    runtime: Runtime = DEFAULT_RUNTIME,
) -> VisionTower:
    """A `VisionTower` run as `runtime` says whose parameters are the `prefix` tensors of a transformers
    Qwen3-VL state dict."""
    unrolled = runtime.replace(scan_layers=False)
    abstract = nnx.eval_shape(lambda: VisionTower(config, unrolled, rngs=nnx.Rngs(0)))
    tower = load_table(abstract, vision_weight_table(config), tensors, prefix)
    return relayout(tower, runtime.scan_layers)


def vision_to_tensors(tower: VisionTower, prefix: str = "visual.") -> dict[str, np.ndarray]:
    """The tower's parameters under transformers' keys and shapes (every declared DeepStack merger included)."""
    tower = relayout(tower, False)
    flat = dict(nnx.to_flat_state(nnx.state(tower, nnx.Param)))
    return {prefix + e.hf_key: e.to_hf(np.asarray(flat[e.path][...])) for e in vision_weight_table(tower.config)}


def qwen3_vl_weight_table(
    config: Qwen3VLConfig, *, text_prefix: str = "language_model.", vision_prefix: str = "visual."
) -> list[WeightEntry]:
    """Every parameter of `Qwen3VL(config)` (unrolled) under full keys: the text table under `text_prefix`
    (an untied LM head at the top, `lm_head.weight`), the tower's under `vision_prefix`. The defaults are
    transformers' `Qwen3VLModel`; `Qwen3VLForConditionalGeneration` nests both under `model.`."""
    text = [
        WeightEntry(("text", *e.path), e.hf_key if e.hf_key == LM_HEAD else text_prefix + e.hf_key, e.hf_shape, e.shape)
        for e in weight_table(config.text)
    ]
    vision = [
        WeightEntry(("visual", *e.path), vision_prefix + e.hf_key, e.hf_shape, e.shape)
        for e in vision_weight_table(config.vision)
    ]
    return text + vision


def qwen3_vl_from_tensors(
    config: Qwen3VLConfig, tensors: Mapping[str, np.ndarray], runtime: Runtime = DEFAULT_RUNTIME, **prefixes: str
) -> Qwen3VL:
    """A `Qwen3VL` whose parameters are the tensors of a transformers Qwen3-VL state dict (`prefixes` as
    `qwen3_vl_weight_table` takes them); scanned parts are stacked after loading."""
    unrolled = runtime.replace(scan_layers=False)
    abstract = nnx.eval_shape(lambda: Qwen3VL(config, unrolled, rngs=nnx.Rngs(0)))
    model = load_table(abstract, qwen3_vl_weight_table(config, **prefixes), tensors)
    text = transformer.relayout(model.text, runtime.scan_layers)
    visual = relayout(model.visual, runtime.scan_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen3VL(config, runtime, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.State({"text": nnx.state(text), "visual": nnx.state(visual)}))
