"""The user verbs over Hugging Face directories: `from_pretrained` (dispatching on what a directory holds)
and `save_pretrained`, for the text model; the weight tables and the generic reading and writing behind
them are in `io.weights`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bidirlm_jax import sharding
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.checkpoint import load_checkpoint
from bidirlm_jax.io.companions import Companions
from bidirlm_jax.io.hf_config import config_to_hf, read_config, read_runtime
from bidirlm_jax.io.layouts import CAUSAL_LM, detect_layout
from bidirlm_jax.io.qwen3_asr import holds_qwen3_asr, load_qwen3_asr, save_qwen3_asr
from bidirlm_jax.io.run import description_dir
from bidirlm_jax.io.shards import DEFAULT_MAX_SHARD_BYTES, torch_dtype_name
from bidirlm_jax.io.sources import Source, source_of
from bidirlm_jax.io.weights.load import load_state
from bidirlm_jax.io.weights.readers import open_weights
from bidirlm_jax.io.weights.save import write_tables
from bidirlm_jax.io.weights.text import text_tables
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.towers.qwen3_asr.model import Qwen3ASR
from bidirlm_jax.models.transformer import Transformer, abstract_model, relayout
from bidirlm_jax.paths import user_path


def load_params(
    path: str | os.PathLike,
    config: ModelConfig,
    runtime: Runtime = DEFAULT_RUNTIME,
    *,
    mesh: Mesh | None = None,
    allow_pickle: bool = False,
) -> Transformer:
    """Build a `Transformer` for `config`, run as `runtime` says, whose parameters are read from the checkpoint
    at `path`."""
    if runtime.scan_layers:  # HF files hold one tensor per layer: read them so, then stack
        unrolled = load_params(path, config, runtime.replace(scan_layers=False), mesh=mesh, allow_pickle=allow_pickle)
        return sharding.place(relayout(unrolled, True), mesh)
    reader = open_weights(path, allow_pickle=allow_pickle)
    tables = text_tables(config)
    layout = detect_layout(reader.keys(), [t.component for t in tables])
    return load_state(abstract_model(config, runtime), reader, layout, tables, dtype=runtime.param_dtype, mesh=mesh)


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
) -> Transformer | Qwen3ASR:
    """Load an HF checkpoint directory, a bidirlm checkpoint (`bidirlm convert`) or a training run (its
    latest step) as a model: a `Qwen3ASR` (text + audio tower) for a Qwen3-ASR checkpoint unless
    `text_only` asks for its text backbone alone, else a `Transformer`.

    `runtime` (`models.runtime.Runtime`) declares every run setting, the attention mode included (scanned
    layers, remat, kernel...); without it, `attention` and `bidirectional_window` default to what the
    checkpoint's config.json records (causal for a plain decoder) and `dtype` is both the parameter and the
    compute dtype.
    """
    path = user_path(path)
    where = description_dir(path)
    if runtime is None:
        mode = {"attention": attention, "bidirectional_window": bidirectional_window}
        runtime = read_runtime(
            where, dtype=dtype, param_dtype=dtype, **{k: v for k, v in mode.items() if v is not None}
        )
    elif attention is not None or bidirectional_window is not None or dtype != "float32":
        raise ConfigError(
            "from_pretrained got a runtime and attention/bidirectional_window/dtype: declare the run settings "
            "once, in the runtime (runtime.replace(attention=...))"
        )
    if not text_only and holds_qwen3_asr(where):
        return load_qwen3_asr(path, runtime, mesh=mesh, allow_pickle=allow_pickle)
    config = read_config(where)
    if source_of(path) is Source.HF:
        return load_params(path, config, runtime, mesh=mesh, allow_pickle=allow_pickle)
    return load_checkpoint(
        path, config, runtime, mesh=mesh
    )  # our checkpoints and training runs (fine-tuning ones refused)


# --- writing ------------------------------------------------------------------------------------


def save_pretrained(
    model: Transformer | Qwen3ASR,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    tensor_dtypes: Mapping[str, str] | None = None,
    overwrite: bool = False,
    extra_files: Companions | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write an HF directory that transformers loads natively, in the model's attention mode.

    Tensors are written in `dtype` (default: the parameters'), except those `tensor_dtypes` names
    (backbone-relative keys, as `stored_dtypes` returns them), one at a time, into shards with an
    index above `max_shard_bytes`; `extra_files` (`companion_files(src)`: the tokenizer, processors, …)
    are copied beside them. In a multi-process run every process calls this: each tensor is gathered to
    process 0, which writes. A `Qwen3ASR` is written as transformers' `Qwen3ASRForConditionalGeneration`
    (`tensor_dtypes` unused).
    """
    if isinstance(model, Qwen3ASR):
        return save_qwen3_asr(
            model, out_dir, dtype=dtype, overwrite=overwrite, extra_files=extra_files, max_shard_bytes=max_shard_bytes
        )
    model = relayout(model, False)  # HF files hold one tensor per layer
    config = model.config
    default = np.dtype(jnp.dtype(dtype or model.runtime.param_dtype))
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
            hf = config_to_hf(config, model.runtime, dtype=torch_dtype_name(specs[0].dtype))  # the embedding's (first)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            if extra_files is not None:
                extra_files.copy_into(tmp)
    return Path(out_dir)


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
