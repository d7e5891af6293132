"""The user verbs over Hugging Face directories: `from_pretrained` (dispatching on what a directory holds)
and `save_pretrained`, for the text model; the weight tables and the generic reading and writing behind
them are in `io.weights`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bidirlm_jax import sharding
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.checkpoint import load_checkpoint
from bidirlm_jax.io.hf_config import config_to_hf, read_config
from bidirlm_jax.io.layouts import CAUSAL_LM, detect_layout
from bidirlm_jax.io.run import description_dir
from bidirlm_jax.io.shards import DEFAULT_MAX_SHARD_BYTES, torch_dtype_name
from bidirlm_jax.io.sources import Source, source_of
from bidirlm_jax.io.weights.load import load_state
from bidirlm_jax.io.weights.readers import open_weights
from bidirlm_jax.io.weights.save import write_tables
from bidirlm_jax.io.weights.text import text_tables
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.transformer import Transformer, abstract_model, relayout
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
)


def load_params(
    path: str | os.PathLike, config: ModelConfig, *, mesh: Mesh | None = None, allow_pickle: bool = False
) -> Transformer:
    """Build a `Transformer` for `config` whose parameters are read from the checkpoint at `path`."""
    if config.scan_layers:  # HF files hold one tensor per layer: read them so, then stack
        unrolled = load_params(path, config.replace(scan_layers=False), mesh=mesh, allow_pickle=allow_pickle)
        return sharding.place(relayout(unrolled, True), mesh)
    reader = open_weights(path, allow_pickle=allow_pickle)
    tables = text_tables(config)
    layout = detect_layout(reader.keys(), [t.component for t in tables])
    return load_state(abstract_model(config), reader, layout, tables, dtype=config.param_dtype, mesh=mesh)


def from_pretrained(
    path: str | os.PathLike,
    *,
    attention: str | None = None,
    bidirectional_window: str | None = None,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    allow_pickle: bool = False,
    scan_layers: bool = False,
) -> Transformer:
    """Load an HF checkpoint directory, a bidirlm checkpoint (`bidirlm convert`) or a training run (its
    latest step) as a model.

    `attention`/`bidirectional_window` default to what the checkpoint's config.json says (causal for
    a plain decoder). `dtype` is both the parameter and the compute dtype. `scan_layers` stacks the
    layers' parameters for a scanned model, whatever layout the files hold.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
    path = user_path(path)
    mode = {"attention": attention, "bidirectional_window": bidirectional_window}
    overrides = {k: v for k, v in mode.items() if v is not None}
    config = read_config(description_dir(path), dtype=dtype, param_dtype=dtype, scan_layers=scan_layers, **overrides)
    if source_of(path) is Source.HF:
        return load_params(path, config, mesh=mesh, allow_pickle=allow_pickle)
    return load_checkpoint(path, config, mesh=mesh)  # our checkpoints and training runs (fine-tuning ones refused)


# --- writing ------------------------------------------------------------------------------------


def save_pretrained(
    model: Transformer,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    tensor_dtypes: Mapping[str, str] | None = None,
    overwrite: bool = False,
    extra_files: Iterable[Path] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write an HF directory that transformers loads natively, in the model's attention mode.

    Tensors are written in `dtype` (default: the parameters'), except those `tensor_dtypes` names
    (backbone-relative keys, as `stored_dtypes` returns them), one at a time, into shards with an
    index above `max_shard_bytes`; `extra_files` (e.g. `tokenizer_files(src)`) are copied beside them.
    In a multi-process run every process calls this: each tensor is gathered to process 0, which writes.
    """
    model = relayout(model, False)  # HF files hold one tensor per layer
    config = model.config
    default = np.dtype(jnp.dtype(dtype or config.param_dtype))
    with atomic_directory(out_dir, overwrite=overwrite, collective=True) as tmp:
        specs = write_tables(
            tmp,
            model,
            CAUSAL_LM,
            text_tables(config),
            dtype=default,
            tensor_dtypes=tensor_dtypes,
            max_shard_bytes=max_shard_bytes,
        )
        if jax.process_index() == 0:
            hf = config_to_hf(config, dtype=torch_dtype_name(specs[0].dtype))  # the embedding's (first entry)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            for file in extra_files:
                shutil.copy2(file, tmp / Path(file).name)
    return Path(out_dir)


def tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The tokenizer (and generation) files of an HF directory or a run, to carry into a converted one."""
    where = description_dir(path)
    return [where / name for name in TOKENIZER_FILES if (where / name).is_file()]


def stored_dtypes(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, str]:
    """dtype name of every backbone tensor as stored (backbone-relative keys), to re-export each in its
    own precision; safetensors headers only, no tensor is read."""
    reader = open_weights(path, allow_pickle=allow_pickle)
    layout = detect_layout(reader.keys())
    return {
        canonical: jnp.dtype(reader.dtype(key)).name
        for key in reader.keys()
        if (canonical := layout.to_canonical(key)) is not None
    }
