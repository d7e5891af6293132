"""The user verbs over Hugging Face directories: `from_pretrained` (dispatching on what a directory holds)
and `save_pretrained`, for every model type (`io.model_types`: the text model, Qwen3-VL, Qwen3-ASR); the weight tables
and the generic reading and writing behind them are in `io.weights`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bidirlm_jax import sharding
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io import released
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.checkpoint import latest_step, load_checkpoint
from bidirlm_jax.io.companions import Companions
from bidirlm_jax.io.hf_config import read_config_dict, runtime_from_hf
from bidirlm_jax.io.layouts import AUDIO, AUDIO_PROJECTOR, HEAD, TEXT, VISION, detect_layout
from bidirlm_jax.io.lora import attach, base_of, read_record, stacked
from bidirlm_jax.io.model_types import (
    OMNI_TYPE,
    TEXT_TYPE,
    described_type,
    export_type,
    model_type_in,
    model_type_of,
)
from bidirlm_jax.io.run import description_dir, is_training_run, state_dir
from bidirlm_jax.io.shards import DEFAULT_MAX_SHARD_BYTES, torch_dtype_name
from bidirlm_jax.io.sources import Source, source_of
from bidirlm_jax.io.weights.load import load_state
from bidirlm_jax.io.weights.readers import open_weights
from bidirlm_jax.io.weights.save import write_tables
from bidirlm_jax.io.weights.table import dtype_key
from bidirlm_jax.models.lora import merge_adapters
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.transformer import relayout
from bidirlm_jax.paths import user_path

# The backbone prefix of transformers' multimodal base models (Qwen3VLModel, BidirLM-Omni), which have no LM head.
BASE_MULTIMODAL = "language_model."
log = logging.getLogger(__name__)


def load_params(
    path: str | os.PathLike,
    config: Any,
    runtime: Runtime = DEFAULT_RUNTIME,
    *,
    mesh: Mesh | None = None,
    allow_pickle: bool = False,
) -> nnx.Module:
    """Build the model `config` describes (a `Transformer`, a `Qwen3VL`), run as `runtime` says, with its
    parameters read from the checkpoint at `path`."""
    return load_weights(open_weights(path, allow_pickle=allow_pickle), config, runtime, mesh=mesh)


def load_weights(reader, config: Any, runtime: Runtime = DEFAULT_RUNTIME, *, mesh: Mesh | None = None) -> nnx.Module:
    """The model `config` describes, run as `runtime` says, every parameter read from `reader` (`io.weights`'
    readers, or a `TensorDict` of a state dict's arrays)."""
    kind = model_type_of(config)
    layout = detect_layout(reader.keys(), kind.components)
    text = kind.text(config)
    if not text.tie_word_embeddings and layout.prefix(HEAD) is None and _headless_class(layout, reader.keys()):
        log.warning(
            "this checkpoint of a base or classifier class holds no LM head: its logits use the input embedding"
        )
        config = kind.with_text(config, text.replace(tie_word_embeddings=True))
    unrolled = runtime.replace(scan_layers=False)  # HF files hold one tensor per layer: read them so, then stack
    abstract = kind.abstract(config, unrolled)
    model = load_state(abstract, reader, layout, kind.tables(config, layout), dtype=runtime.param_dtype, mesh=mesh)
    return sharding.place(kind.relayout(model, True), mesh) if runtime.scan_layers else model


def _headless_class(layout, keys) -> bool:
    """Whether a checkpoint was saved by a class without an LM head: a base multimodal model, a bare backbone
    (`AutoModel`), or a classifier (a released BidirLM one keeps its head as `classifier.*`)."""
    return layout.prefix(TEXT) in (BASE_MULTIMODAL, "") or released.CLASSIFIER_KEY in keys


def from_pretrained(
    path: str | os.PathLike,
    *,
    attention: str | None = None,
    bidirectional_window: str | None = None,
    dtype: str = "float32",
    runtime: Runtime | None = None,
    mesh: Mesh | None = None,
    allow_pickle: bool = False,
    text_only: bool = False,
    vision: bool | None = None,
    audio: bool | None = None,
) -> nnx.Module:
    """Load an HF checkpoint directory, a bidirlm checkpoint (`bidirlm convert`) or a training run (its
    latest step) as a model: a `Qwen3ASR` (text + audio tower) for a Qwen3-ASR checkpoint, a `Qwen3VL`
    (called with transformers' processor outputs) for a Qwen3-VL checkpoint holding its vision tower, else
    a `Transformer`; a BidirLM-Omni checkpoint as an `Omni` with the towers its weights hold. `text_only` (or
    `vision=False` for Qwen3-VL, `audio=False` for Qwen3-ASR, both for Omni) asks for the text backbone alone,
    `vision=False` or `audio=False` alone an Omni model without that tower; `vision=True`/`audio=True` refuse
    a checkpoint without that tower (`io.model_types` decides).

    `runtime` (`models.runtime.Runtime`) declares every run setting, the attention mode included (scanned
    layers, remat, kernel...); without it, `attention` and `bidirectional_window` default to what the
    checkpoint's config.json records (causal for a plain decoder) and `dtype` is both the parameter and the
    compute dtype.
    """
    path = user_path(path)
    where = description_dir(path)
    if text_only and (vision or audio):
        raise ConfigError("from_pretrained got text_only=True and a tower (vision/audio=True): ask for one of them")
    d = read_config_dict(where)
    if runtime is None:
        mode = {"attention": attention, "bidirectional_window": bidirectional_window}
        runtime = runtime_from_hf(d, dtype=dtype, param_dtype=dtype, **{k: v for k, v in mode.items() if v is not None})
    elif attention is not None or bidirectional_window is not None or dtype != "float32":
        raise ConfigError(
            "from_pretrained got a runtime and attention/bidirectional_window/dtype: declare the run settings "
            "once, in the runtime (runtime.replace(attention=...))"
        )
    source = source_of(path)
    tower = _holds_tower(path, d, source, allow_pickle)
    kind = model_type_in(d, tower=tower, text_only=text_only, vision=vision, audio=audio, where=str(path))
    config = kind.read(d)
    if kind is OMNI_TYPE:  # HF weights may lack a tower their config describes; our checkpoints never do
        keys = set(open_weights(path, allow_pickle=allow_pickle).keys()) if source is Source.HF else None
        config = kind.towers(config, keys, vision=vision, audio=audio, where=str(path))
    if source is Source.HF:
        return load_params(path, config, runtime, mesh=mesh, allow_pickle=allow_pickle)
    if is_training_run(path) and read_record(path) is not None:  # a LoRA run: its base, the adapters merged in
        return relayout(merge_adapters(load_adapted(path, runtime, mesh=mesh)), runtime.scan_layers)
    return load_checkpoint(path, config, runtime, mesh=mesh)  # our checkpoints and training runs (fine-tuning refused)


def load_adapted(run: Path, runtime: Runtime, *, mesh: Mesh | None = None) -> nnx.Module:
    """A LoRA run's text model at its latest step, adapters attached (unmerged), laid out as its checkpoint is."""
    base = base_of(run)
    where = state_dir(run, latest_step(run))
    model = from_pretrained(base, runtime=runtime.replace(scan_layers=stacked(where)), mesh=mesh, text_only=True)
    return attach(model, run, where, mesh=mesh)


def _holds_tower(path: Path, d: Mapping[str, Any], source: Source, allow_pickle: bool) -> bool:
    """Whether a directory holds the tower its config.json describes: its HF weights hold the tower's anchor
    tensor (headers only); our checkpoints of a tower model always hold it (a text-only save writes a text
    config)."""
    kind = described_type(d)
    if kind is TEXT_TYPE or source is not Source.HF:
        return kind is not TEXT_TYPE
    return kind.tower.detect(set(open_weights(path, allow_pickle=allow_pickle).keys())) is not None


# --- writing ------------------------------------------------------------------------------------


def save_pretrained(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    tensor_dtypes: Mapping[str, str] | None = None,
    overwrite: bool = False,
    extra_files: Companions | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    format: str = "transformers",
) -> Path:
    """Write an HF directory that transformers loads natively, in the model's attention mode (a `Qwen3VL`
    as transformers' `Qwen3VLForConditionalGeneration`, which its `Qwen3VLModel` loads too); `format="bidirlm"`
    writes a text model as a released BidirLM checkpoint instead (`io.released`: bidirectional only, loaded
    with `trust_remote_code=True` through its `auto_map`; the same tensors and keys).

    Tensors are written in `dtype` (default: the parameters'), except those `tensor_dtypes` names
    (by `io.weights.table.dtype_key`, as `stored_dtypes` returns them), one at a time, into shards with an
    index above `max_shard_bytes`; `extra_files` (`companion_files(src)`: the tokenizer, processors, …)
    are copied beside them. In a multi-process run every process calls this: each tensor is gathered to
    process 0, which writes. A `Qwen3ASR` is written as transformers' `Qwen3ASRForConditionalGeneration`.
    """
    kind = export_type(model, format)
    model = kind.relayout(model, False)  # HF files hold one tensor per layer
    config = model.config
    default = np.dtype(jnp.dtype(dtype or model.runtime.param_dtype))
    kind.write(config, model.runtime)  # refuses what the format cannot hold before anything is written
    with atomic_directory(out_dir, overwrite=overwrite, collective=True) as tmp:
        specs = write_tables(
            tmp,
            model,
            kind.export_layout,
            kind.tables(config),
            dtype=default,
            tensor_dtypes=tensor_dtypes,
            max_shard_bytes=max_shard_bytes,
        )
        if jax.process_index() == 0:
            hf = kind.write(config, model.runtime, dtype=torch_dtype_name(specs[0].dtype))  # the embedding's (first)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            if extra_files is not None:
                extra_files.copy_into(tmp)
    return Path(out_dir)


def stored_dtypes(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, str]:
    """dtype name of every tensor of the text model and the towers as stored (named by `dtype_key`), to
    re-export each in its own precision; safetensors headers only, no tensor is read."""
    reader = open_weights(path, allow_pickle=allow_pickle)
    layout = detect_layout(reader.keys(), (TEXT, HEAD, VISION, AUDIO, AUDIO_PROJECTOR))
    return {
        dtype_key(*where): jnp.dtype(reader.dtype(key)).name
        for key in reader.keys()
        if (where := layout.locate(key)) is not None
    }
