"""Which model class a checkpoint loads as, and how io reads and writes each class: the one place where a
config.json's `model_type` (and the towers its weights hold) picks the class.

A Qwen3-VL directory whose weights hold the vision tower loads as `Qwen3VL` (towers/qwen3_vl), unless the
caller asks for the text backbone alone (`vision=False`); anything else, a Qwen3-VL config without tower
tensors included, loads as the text `Transformer`. Each `ModelType` names its config reader and writer,
weight tables, checkpoint components and export layout, and how to stack its layers, so `from_pretrained`,
`save_pretrained` and the orbax checkpoints serve every class through the same code. How a model runs is
its `Runtime` (one for the text stack and the towers), which config.json records the attention mode of.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.io.hf_config import config_from_hf, config_to_hf
from bidirlm_jax.io.hf_config_vision import qwen3_vl_config_from_hf, qwen3_vl_config_to_hf
from bidirlm_jax.io.layouts import CAUSAL_LM, HEAD, QWEN3_VL, TEXT, VISION, Component, Layout
from bidirlm_jax.io.weights.table import Table
from bidirlm_jax.io.weights.text import text_tables
from bidirlm_jax.io.weights.vision import qwen3_vl_tables
from bidirlm_jax.models import transformer
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.towers.qwen3_vl import model as qwen3_vl
from bidirlm_jax.models.towers.qwen3_vl.config import Qwen3VLConfig


class TextType:
    """The text `Transformer` (a causal LM or an encoder with its LM head)."""

    name = "text"
    model_class = transformer.Transformer
    config_class = ModelConfig
    components: tuple[Component, ...] = (TEXT, HEAD)
    export_layout: Layout = CAUSAL_LM

    def read(self, d: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        return config_from_hf(d, **overrides)

    def write(self, config: ModelConfig, runtime: Runtime, *, dtype: str | None = None) -> dict[str, Any]:
        return config_to_hf(config, runtime, dtype=dtype)

    def tables(self, config: ModelConfig) -> tuple[Table, ...]:
        return text_tables(config)

    def abstract(self, config: ModelConfig, runtime: Runtime) -> tuple[nnx.GraphDef, nnx.State]:
        return transformer.abstract_model(config, runtime)

    def relayout(self, model: nnx.Module, scan_layers: bool) -> nnx.Module:
        return transformer.relayout(model, scan_layers)

    def text(self, config: ModelConfig) -> ModelConfig:
        return config

    def with_text(self, config: ModelConfig, text: ModelConfig) -> ModelConfig:
        return text


class Qwen3VLType(TextType):
    """Qwen3-VL: the text model fed by the vision tower."""

    name = "qwen3_vl"
    model_class = qwen3_vl.Qwen3VL
    config_class = Qwen3VLConfig
    components = (TEXT, HEAD, VISION)
    export_layout = QWEN3_VL

    def read(self, d: Mapping[str, Any], **overrides: Any) -> Qwen3VLConfig:
        return qwen3_vl_config_from_hf(d, **overrides)

    def write(self, config: Qwen3VLConfig, runtime: Runtime, *, dtype: str | None = None) -> dict[str, Any]:
        return qwen3_vl_config_to_hf(config, runtime, dtype=dtype)

    def tables(self, config: Qwen3VLConfig) -> tuple[Table, ...]:
        return qwen3_vl_tables(config)

    def abstract(self, config: Qwen3VLConfig, runtime: Runtime) -> tuple[nnx.GraphDef, nnx.State]:
        return qwen3_vl.abstract_model(config, runtime)

    def relayout(self, model: nnx.Module, scan_layers: bool) -> nnx.Module:
        return qwen3_vl.relayout(model, scan_layers)

    def text(self, config: Qwen3VLConfig) -> ModelConfig:
        return config.text

    def with_text(self, config: Qwen3VLConfig, text: ModelConfig) -> Qwen3VLConfig:
        return config.replace(text=text)


TEXT_TYPE, QWEN3_VL_TYPE = TextType(), Qwen3VLType()
_TYPES = (QWEN3_VL_TYPE, TEXT_TYPE)  # subclasses first


def holds_vision(d: Mapping[str, Any]) -> bool:
    """Whether a config.json describes a model with a vision tower (its weights may still lack it)."""
    return isinstance(d, Mapping) and d.get("model_type") == "qwen3_vl"  # anything else is refused by its reader


def model_type_in(d: Mapping[str, Any], *, tower: bool, vision: bool | None = None, where: str = "") -> TextType:
    """The model type a checkpoint with config.json `d` loads as; `tower`: whether its weights hold the vision
    tower; `vision`: None (the tower when it is there), False (the text backbone alone), True (the tower or
    an error)."""
    has = holds_vision(d) and tower
    if vision and not has:
        why = "its weights hold no visual.* tensors" if holds_vision(d) else "its config.json is not Qwen3-VL's"
        raise CheckpointError(
            f"{where or 'this checkpoint'} has no vision tower ({why}): it cannot take images; load a Qwen3-VL "
            "checkpoint, or load this one without vision=True for text"
        )
    return QWEN3_VL_TYPE if has and vision is not False else TEXT_TYPE


def model_type_of(model_or_config: Any) -> TextType:
    """The model type of a model or of its config."""
    for kind in _TYPES:
        if isinstance(model_or_config, (kind.model_class, kind.config_class)):
            return kind
    raise TypeError(f"no model type for {type(model_or_config).__name__}")
