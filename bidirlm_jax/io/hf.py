"""The user verbs over Hugging Face directories: `from_pretrained` (dispatching on what a directory holds)
and `save_pretrained`, for every model type (`io.model_types`: the text model, Qwen3-VL); the weight tables
and the generic reading and writing behind them are in `io.weights`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bidirlm_jax import sharding
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.checkpoint import load_checkpoint
from bidirlm_jax.io.hf_config import read_config_dict
from bidirlm_jax.io.layouts import HEAD, TEXT, VISION, detect_layout
from bidirlm_jax.io.model_types import holds_vision, model_type_in, model_type_of
from bidirlm_jax.io.run import description_dir
from bidirlm_jax.io.shards import DEFAULT_MAX_SHARD_BYTES, torch_dtype_name
from bidirlm_jax.io.sources import Source, source_of
from bidirlm_jax.io.weights.load import load_state
from bidirlm_jax.io.weights.readers import open_weights
from bidirlm_jax.io.weights.save import write_tables
from bidirlm_jax.io.weights.table import dtype_key
from bidirlm_jax.paths import user_path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",  # a vision model's image processor settings (data.media reads them)
    "video_preprocessor_config.json",
)
# The backbone prefix of transformers' multimodal base models (Qwen3VLModel, BidirLM-Omni), which have no LM head.
BASE_MULTIMODAL = "language_model."
log = logging.getLogger(__name__)


def load_params(
    path: str | os.PathLike, config: Any, *, mesh: Mesh | None = None, allow_pickle: bool = False
) -> nnx.Module:
    """Build the model `config` describes (a `Transformer`, a `Qwen3VL`) with its parameters read from
    the checkpoint at `path`."""
    return load_weights(open_weights(path, allow_pickle=allow_pickle), config, mesh=mesh)


def load_weights(reader, config: Any, *, mesh: Mesh | None = None) -> nnx.Module:
    """The model `config` describes, every parameter read from `reader` (`io.weights`' readers, or a
    `TensorDict` of a state dict's arrays)."""
    kind = model_type_of(config)
    scanned = kind.text(config).scan_layers
    unrolled = kind.with_scan(config, False)  # HF files hold one tensor per layer: read them so, then stack
    layout = detect_layout(reader.keys(), kind.components)
    text = kind.text(unrolled)
    if not text.tie_word_embeddings and layout.prefix(HEAD) is None and layout.prefix(TEXT) == BASE_MULTIMODAL:
        log.warning("this base multimodal checkpoint holds no LM head: its logits use the tied input embedding")
        unrolled = kind.with_text(unrolled, text.replace(tie_word_embeddings=True))
    abstract = kind.abstract(unrolled)
    model = load_state(abstract, reader, layout, kind.tables(unrolled), dtype=text.param_dtype, mesh=mesh)
    return sharding.place(kind.relayout(model, True), mesh) if scanned else model


def from_pretrained(
    path: str | os.PathLike,
    *,
    attention: str | None = None,
    bidirectional_window: str | None = None,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    allow_pickle: bool = False,
    scan_layers: bool = False,
    vision: bool | None = None,
) -> nnx.Module:
    """Load an HF checkpoint directory, a bidirlm checkpoint (`bidirlm convert`) or a training run (its
    latest step) as a model: a Qwen3-VL checkpoint with its vision tower as a `Qwen3VL` (called with
    transformers' processor outputs), unless `vision=False` (its text backbone alone); anything else as a
    `Transformer`. `vision=True` refuses a checkpoint without a tower.

    `attention`/`bidirectional_window` default to what the checkpoint's config.json says (causal for
    a plain decoder). `dtype` is both the parameter and the compute dtype. `scan_layers` stacks the
    layers' parameters for a scanned model, whatever layout the files hold.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
    path = user_path(path)
    mode = {"attention": attention, "bidirectional_window": bidirectional_window}
    overrides = {k: v for k, v in mode.items() if v is not None}
    d = read_config_dict(description_dir(path))
    source = source_of(path)
    kind = model_type_in(d, tower=_holds_tower(path, d, source, allow_pickle), vision=vision, where=str(path))
    config = kind.read(d, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers, **overrides)
    if source is Source.HF:
        return load_params(path, config, mesh=mesh, allow_pickle=allow_pickle)
    return load_checkpoint(path, config, mesh=mesh)  # our checkpoints and training runs (fine-tuning ones refused)


def _holds_tower(path: Path, d: Mapping[str, Any], source: Source, allow_pickle: bool) -> bool:
    """Whether a vision model's directory holds the tower: its HF weights hold the tower's anchor tensor
    (headers only); our checkpoints of a vision model always hold it (a text-only save writes a text config)."""
    if not holds_vision(d) or source is not Source.HF:
        return holds_vision(d)
    return VISION.detect(set(open_weights(path, allow_pickle=allow_pickle).keys())) is not None


# --- writing ------------------------------------------------------------------------------------


def save_pretrained(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    tensor_dtypes: Mapping[str, str] | None = None,
    overwrite: bool = False,
    extra_files: Iterable[Path] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write an HF directory that transformers loads natively, in the model's attention mode (a `Qwen3VL`
    as transformers' `Qwen3VLForConditionalGeneration`, which its `Qwen3VLModel` loads too).

    Tensors are written in `dtype` (default: the parameters'), except those `tensor_dtypes` names
    (by `io.weights.table.dtype_key`, as `stored_dtypes` returns them), one at a time, into shards with an
    index above `max_shard_bytes`; `extra_files` (e.g. `tokenizer_files(src)`) are copied beside them.
    In a multi-process run every process calls this: each tensor is gathered to process 0, which writes.
    """
    kind = model_type_of(model)
    model = kind.relayout(model, False)  # HF files hold one tensor per layer
    config = model.config
    default = np.dtype(jnp.dtype(dtype or kind.text(config).param_dtype))
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
            hf = kind.write(config, dtype=torch_dtype_name(specs[0].dtype))  # the embedding's (first entry)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            for file in extra_files:
                shutil.copy2(file, tmp / Path(file).name)
    return Path(out_dir)


def tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The tokenizer (and generation) files of an HF directory or a run, to carry into a converted one."""
    where = description_dir(path)
    return [where / name for name in TOKENIZER_FILES if (where / name).is_file()]


def stored_dtypes(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, str]:
    """dtype name of every tensor of the text model and the towers as stored (named by `dtype_key`), to
    re-export each in its own precision; safetensors headers only, no tensor is read."""
    reader = open_weights(path, allow_pickle=allow_pickle)
    layout = detect_layout(reader.keys(), (TEXT, HEAD, VISION))
    return {
        dtype_key(*where): jnp.dtype(reader.dtype(key)).name
        for key in reader.keys()
        if (where := layout.locate(key)) is not None
    }
