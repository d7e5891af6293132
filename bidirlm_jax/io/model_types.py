"""Which model class a checkpoint loads as, and how io reads and writes each class: the one place where a
config.json's `model_type` (and the towers its weights hold) picks the class.

A Qwen3-ASR directory loads as `Qwen3ASR` (towers/qwen3_asr) and refuses weights without the audio tower;
a Qwen3-VL directory whose weights hold the vision tower loads as `Qwen3VL` (towers/qwen3_vl), and without
it as the text `Transformer`; anything else, or either when the caller asks for the text backbone alone
(`text_only`), as the text `Transformer`. Each model type names its config reader and writer, weight
tables, checkpoint components and export layout, and how to stack its layers, so `from_pretrained`,
`save_pretrained`, `convert` and the orbax checkpoints serve every class through the same code. How a
model runs is its `Runtime` (one for the text stack and the towers), whose attention mode config.json records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flax import nnx

from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io import EXPORT_FORMATS, released
from bidirlm_jax.io.hf_config import config_from_hf, config_to_hf
from bidirlm_jax.io.hf_config_audio import is_qwen3_asr, qwen3_asr_config_from_hf, qwen3_asr_config_to_hf
from bidirlm_jax.io.hf_config_omni import is_omni, omni_config_from_hf, omni_config_to_hf
from bidirlm_jax.io.hf_config_vision import qwen3_vl_config_from_hf, qwen3_vl_config_to_hf
from bidirlm_jax.io.layouts import (
    AUDIO,
    AUDIO_PROJECTOR,
    BIDIRLM_OMNI,
    CAUSAL_LM,
    HEAD,
    QWEN3_ASR_HF,
    QWEN3_VL,
    TEXT,
    VISION,
    Component,
    Layout,
)
from bidirlm_jax.io.weights.audio import qwen3_asr_tables
from bidirlm_jax.io.weights.omni import omni_tables
from bidirlm_jax.io.weights.table import Table
from bidirlm_jax.io.weights.text import text_tables
from bidirlm_jax.io.weights.vision import qwen3_vl_tables
from bidirlm_jax.models import transformer
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.towers.omni import model as omni
from bidirlm_jax.models.towers.omni.config import OmniConfig
from bidirlm_jax.models.towers.qwen3_asr import model as qwen3_asr
from bidirlm_jax.models.towers.qwen3_asr.config import Qwen3ASRConfig
from bidirlm_jax.models.towers.qwen3_vl import model as qwen3_vl
from bidirlm_jax.models.towers.qwen3_vl.config import Qwen3VLConfig


class TextType:
    """The text `Transformer` (a causal LM or an encoder with its LM head)."""

    name = "text"
    model_class: type = transformer.Transformer
    config_class: type = ModelConfig
    components: tuple[Component, ...] = (TEXT, HEAD)
    tower: Component | None = None  # the tensor group whose presence makes a checkpoint this type
    export_layout: Layout = CAUSAL_LM

    def read(self, d: Mapping[str, Any], **overrides: Any) -> Any:
        return config_from_hf(d, **overrides)

    def write(self, config: Any, runtime: Runtime, *, dtype: str | None = None) -> dict[str, Any]:
        return config_to_hf(config, runtime, dtype=dtype)

    def tables(self, config: Any, layout: Layout | None = None) -> tuple[Table, ...]:
        """The weight tables of an unrolled model; `layout`: the checkpoint's (None: the export layout)."""
        return text_tables(config)

    def abstract(self, config: Any, runtime: Runtime) -> tuple[nnx.GraphDef, nnx.State]:
        return transformer.abstract_model(config, runtime)

    def relayout(self, model: nnx.Module, scan_layers: bool) -> nnx.Module:
        return transformer.relayout(model, scan_layers)

    def text(self, config: Any) -> ModelConfig:
        return config

    def with_text(self, config: Any, text: ModelConfig) -> Any:
        return text


class _TowerType(TextType):
    """A text model fed by a tower: its config holds the text model's as `text`."""

    def text(self, config: Any) -> ModelConfig:
        return config.text

    def with_text(self, config: Any, text: ModelConfig) -> Any:
        return config.replace(text=text)


class Qwen3VLType(_TowerType):
    """Qwen3-VL: the text model fed by the vision tower."""

    name = "qwen3_vl"
    model_class = qwen3_vl.Qwen3VL
    config_class = Qwen3VLConfig
    components = (TEXT, HEAD, VISION)
    tower = VISION
    export_layout = QWEN3_VL

    def read(self, d: Mapping[str, Any], **overrides: Any) -> Qwen3VLConfig:
        return qwen3_vl_config_from_hf(d, **overrides)

    def write(self, config: Qwen3VLConfig, runtime: Runtime, *, dtype: str | None = None) -> dict[str, Any]:
        return qwen3_vl_config_to_hf(config, runtime, dtype=dtype)

    def tables(self, config: Qwen3VLConfig, layout: Layout | None = None) -> tuple[Table, ...]:
        return qwen3_vl_tables(config)

    def abstract(self, config: Qwen3VLConfig, runtime: Runtime) -> tuple[nnx.GraphDef, nnx.State]:
        return qwen3_vl.abstract_model(config, runtime)

    def relayout(self, model: nnx.Module, scan_layers: bool) -> nnx.Module:
        return qwen3_vl.relayout(model, scan_layers)


class Qwen3ASRType(_TowerType):
    """Qwen3-ASR: the text model fed by the AuT audio tower (transformers' -hf layout, or the original
    `thinker.*` one with the projector inside the tower)."""

    name = "qwen3_asr"
    model_class = qwen3_asr.Qwen3ASR
    config_class = Qwen3ASRConfig
    components = (TEXT, HEAD, AUDIO, AUDIO_PROJECTOR)
    tower = AUDIO
    export_layout = QWEN3_ASR_HF

    def read(self, d: Mapping[str, Any], **overrides: Any) -> Qwen3ASRConfig:
        return qwen3_asr_config_from_hf(d, **overrides)

    def write(self, config: Qwen3ASRConfig, runtime: Runtime, *, dtype: str | None = None) -> dict[str, Any]:
        return qwen3_asr_config_to_hf(config, runtime, dtype=dtype)

    def tables(self, config: Qwen3ASRConfig, layout: Layout | None = None) -> tuple[Table, ...]:
        outside = layout is None or layout.prefix(AUDIO_PROJECTOR) is not None
        return qwen3_asr_tables(config, projector_outside=outside)

    def abstract(self, config: Qwen3ASRConfig, runtime: Runtime) -> tuple[nnx.GraphDef, nnx.State]:
        return qwen3_asr.abstract_model(config, runtime)

    def relayout(self, model: nnx.Module, scan_layers: bool) -> nnx.Module:
        return qwen3_asr.relayout(model, scan_layers)


class OmniType(_TowerType):
    """BidirLM-Omni: the text model fed by the vision and the audio towers, each present or not (`towers`)."""

    name = "bidirlm_omni"
    model_class = omni.Omni
    config_class = OmniConfig
    components = (TEXT, HEAD, VISION, AUDIO)
    tower = VISION  # either tower makes it one; `towers` decides which it loads
    export_layout = BIDIRLM_OMNI

    def read(self, d: Mapping[str, Any], **overrides: Any) -> OmniConfig:
        return omni_config_from_hf(d, **overrides)

    def write(self, config: OmniConfig, runtime: Runtime, *, dtype: str | None = None) -> dict[str, Any]:
        return omni_config_to_hf(config, runtime, dtype=dtype)

    def tables(self, config: OmniConfig, layout: Layout | None = None) -> tuple[Table, ...]:
        return omni_tables(config)

    def abstract(self, config: OmniConfig, runtime: Runtime) -> tuple[nnx.GraphDef, nnx.State]:
        return omni.abstract_model(config, runtime)

    def relayout(self, model: nnx.Module, scan_layers: bool) -> nnx.Module:
        return omni.relayout(model, scan_layers)

    def towers(
        self, config: OmniConfig, keys: set[str] | None, *, vision: bool | None, audio: bool | None, where: str
    ) -> OmniConfig:
        """`config` with the towers that the weights' `keys` hold (None: all it describes) and the caller
        wants (None: when there, False: never, True: there or an error)."""
        for name, component, wanted in (("vision", VISION, vision), ("audio", AUDIO, audio)):
            described = getattr(config, name) is not None
            held = described and (keys is None or component.detect(keys) is not None)
            if wanted and not held:
                why = "its weights hold no such tensors" if described else "its config.json describes none"
                raise CheckpointError(
                    f"{where} has no {name} tower ({why}); load it without {name}=True, or load an Omni "
                    f"checkpoint that holds the {name} tower"
                )
            if not held or wanted is False:
                config = config.without(**{name: True})
        return config


class BidirLMType(TextType):
    """The text `Transformer` written as a released BidirLM checkpoint (`io.released`: `model_type: bidirlm`,
    the released code through `auto_map`, keys as `BidirLMForMaskedLM`'s); read like any text checkpoint."""

    name = released.BIDIRLM

    def write(self, config: Any, runtime: Runtime, *, dtype: str | None = None) -> dict[str, Any]:
        source = dict(config.extra).get("auto_map")
        native = config_to_hf(config, runtime, dtype=dtype)
        return released.to_released(native, source_auto_map=json.loads(source) if source else None)


TEXT_TYPE, QWEN3_VL_TYPE, QWEN3_ASR_TYPE = TextType(), Qwen3VLType(), Qwen3ASRType()
OMNI_TYPE = OmniType()
_TYPES = (OMNI_TYPE, QWEN3_ASR_TYPE, QWEN3_VL_TYPE, TEXT_TYPE)
BIDIRLM_TYPE = BidirLMType()


def described_type(d: Mapping[str, Any]) -> TextType:
    """The model type a config.json describes, whether or not its weights hold the tower."""
    if is_omni(d):
        return OMNI_TYPE
    if is_qwen3_asr(d):
        return QWEN3_ASR_TYPE
    if isinstance(d, Mapping) and d.get("model_type") == "qwen3_vl":  # anything else is refused by its reader
        return QWEN3_VL_TYPE
    return TEXT_TYPE


def model_type_in(
    d: Mapping[str, Any],
    *,
    tower: bool,
    text_only: bool = False,
    vision: bool | None = None,
    audio: bool | None = None,
    where: str = "",
) -> TextType:
    """The model type a checkpoint with config.json `d` loads as; `tower`: whether its weights hold the tower
    that config describes; `text_only`: the text backbone alone; `vision`/`audio`: None (the tower when it is
    there), True (the tower or an error), False (without it: the text backbone, or an Omni model without
    that tower — `OmniType.towers` — and the text backbone when both are False)."""
    kind = described_type(d)
    where = where or "this checkpoint"
    if kind is OMNI_TYPE:
        return TEXT_TYPE if text_only or (vision is False and audio is False) else OMNI_TYPE
    if vision and not (kind is QWEN3_VL_TYPE and tower):
        why = "its weights hold no visual.* tensors" if kind is QWEN3_VL_TYPE else "its config.json is not Qwen3-VL's"
        raise CheckpointError(
            f"{where} has no vision tower ({why}): it cannot take images; load a Qwen3-VL "
            "checkpoint, or load this one without vision=True for text"
        )
    if audio and not (kind is QWEN3_ASR_TYPE and tower):
        raise CheckpointError(
            f"{where} has no audio tower: it cannot take audio; load a Qwen3-ASR or BidirLM-Omni checkpoint, "
            "or load this one without audio=True"
        )
    if text_only or vision is False or (audio is False and kind is QWEN3_ASR_TYPE) or kind is TEXT_TYPE:
        return TEXT_TYPE
    if not tower and kind is QWEN3_ASR_TYPE:
        raise CheckpointError(
            f"{where}'s config.json describes Qwen3-ASR but its weights hold no audio tower (`audio_tower.conv2d1."
            "weight` under any known prefix); load the text backbone alone with text_only=True"
        )
    return kind if tower else TEXT_TYPE


def export_type(model_or_config: Any, export_format: str = "transformers") -> TextType:
    """How a model is written in `export_format` (`EXPORT_FORMATS`): its own type, or a text model as BidirLM's."""
    kind = model_type_of(model_or_config)
    if export_format not in EXPORT_FORMATS:
        raise ConfigError(f"export format {export_format!r} is not one of {EXPORT_FORMATS}")
    if export_format == "transformers":
        return kind
    if kind is not TEXT_TYPE:
        raise ConfigError(f"the {export_format} format holds text models; a {kind.name} model exports as transformers")
    return BIDIRLM_TYPE


def model_type_of(model_or_config: Any) -> TextType:
    """The model type of a model or of its config."""
    for kind in _TYPES:
        if isinstance(model_or_config, (kind.model_class, kind.config_class)):
            return kind
    raise TypeError(f"no model type for {type(model_or_config).__name__}")
