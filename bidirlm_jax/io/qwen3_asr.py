"""Qwen3-ASR checkpoints: reading transformers' -hf layout, the original `thinker.*` one (and the AuT tower
of any layout `io.layouts` knows) into a `Qwen3ASR`, writing the -hf layout that transformers loads as
`Qwen3ASRForConditionalGeneration`, and the project's own (orbax) checkpoints of the whole model.

The text backbone and LM head go through the text tables, the tower through `io.weights.audio`, all in one
generic read or write; HF files and checkpoints hold one tensor per layer (scanned parts are stacked after).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from bidirlm_jax import sharding
from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.companions import Companions
from bidirlm_jax.io.hf_config_audio import is_qwen3_asr, qwen3_asr_config_from_hf, qwen3_asr_config_to_hf
from bidirlm_jax.io.layouts import AUDIO, AUDIO_PROJECTOR, HEAD, QWEN3_ASR_HF, TEXT, detect_layout
from bidirlm_jax.io.run import is_training_run
from bidirlm_jax.io.shards import DEFAULT_MAX_SHARD_BYTES, torch_dtype_name
from bidirlm_jax.io.sources import PARAMS_DIR
from bidirlm_jax.io.weights.audio import audio_tables
from bidirlm_jax.io.weights.load import load_state
from bidirlm_jax.io.weights.readers import open_weights
from bidirlm_jax.io.weights.save import write_tables
from bidirlm_jax.io.weights.table import Table
from bidirlm_jax.io.weights.text import text_tables
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.towers.qwen3_asr.config import Qwen3ASRConfig
from bidirlm_jax.models.towers.qwen3_asr.model import Qwen3ASR
from bidirlm_jax.models.transformer import relayout, stack_layers, unstack_layers


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path / 'config.json'}: {e}") from e


def holds_qwen3_asr(where: Path) -> bool:
    """Whether the directory's config.json (of an HF directory or one of our checkpoints) is Qwen3-ASR's."""
    return (where / "config.json").is_file() and is_qwen3_asr(read_json(where))


def qwen3_asr_tables(config: Qwen3ASRConfig, *, projector_outside: bool) -> tuple[Table, ...]:
    """Every parameter of an unrolled `Qwen3ASR(config)`: the text tables under `text`, the tower's under
    `audio_tower`."""
    text = tuple(t.under("text") for t in text_tables(config.text))
    return text + tuple(t.under("audio_tower") for t in audio_tables(config.audio, projector_outside=projector_outside))


def relayout_model(model: Qwen3ASR, scan_layers: bool) -> Qwen3ASR:
    """`model` with its text and audio layers scanned or unrolled (arrays restacked)."""
    if model.runtime.scan_layers == scan_layers:
        return model
    audio_state = nnx.state(model.audio_tower)
    audio_state = stack_layers(audio_state) if scan_layers else unstack_layers(audio_state)
    text = relayout(model.text, scan_layers)
    runtime = model.runtime.replace(scan_layers=scan_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen3ASR(model.config, runtime, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.State({"text": nnx.state(text), "audio_tower": audio_state}))


def load_qwen3_asr(
    path: Path, runtime: Runtime = DEFAULT_RUNTIME, *, mesh: Mesh | None = None, allow_pickle: bool = False
) -> Qwen3ASR:
    """A `Qwen3ASR` run as `runtime` says from an HF directory (-hf or `thinker.*` layout) or one of our
    checkpoints of it."""
    if is_training_run(path):
        raise CheckpointError(
            f"{path} is a training run of a Qwen3-ASR model, which cannot be read yet; "
            "load its exported HF directory instead"
        )
    config = qwen3_asr_config_from_hf(read_json(path))
    unrolled = runtime.replace(scan_layers=False)
    if (path / PARAMS_DIR).is_dir():
        model = _restore(path, config, unrolled, mesh)
    else:
        reader = open_weights(path, allow_pickle=allow_pickle)
        layout = detect_layout(reader.keys(), (TEXT, HEAD, AUDIO, AUDIO_PROJECTOR))
        if layout.prefix(AUDIO) is None:
            raise CheckpointError(
                f"{path}'s config.json describes Qwen3-ASR but its weights hold no audio tower (`audio_tower.conv2d1."
                "weight` under any known prefix); load the text backbone alone with text_only=True"
            )
        tables = qwen3_asr_tables(config, projector_outside=layout.prefix(AUDIO_PROJECTOR) is not None)
        abstract = nnx.split(nnx.eval_shape(lambda: Qwen3ASR(config, unrolled, rngs=nnx.Rngs(0))))
        model = load_state(abstract, reader, layout, tables, dtype=runtime.param_dtype, mesh=mesh)
    if runtime.scan_layers:
        model = sharding.place(relayout_model(model, True), mesh)
    return model


def _restore(path: Path, config: Qwen3ASRConfig, runtime: Runtime, mesh: Mesh | None) -> Qwen3ASR:
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3ASR(config, runtime, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(var: nnx.Variable):
        placement = sharding.variable_sharding(var, mesh) if mesh is not None else device
        return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=placement))

    abstract = jax.tree.map(target, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    try:
        state = ocp.StandardCheckpointer().restore((path / PARAMS_DIR).resolve(), abstract)
    except Exception as e:  # orbax and tensorstore raise many types for a damaged checkpoint
        raise CheckpointError(
            f"cannot restore {path / PARAMS_DIR} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}); "
            "the checkpoint is damaged or was written for another config — write it again"
        ) from e
    return nnx.merge(graphdef, state)


def save_qwen3_asr(
    model: Qwen3ASR,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    extra_files: Companions | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the -hf layout transformers loads as `Qwen3ASRForConditionalGeneration` (tensors in `dtype`,
    default the parameters'), with `extra_files` (tokenizer, preprocessor_config.json) beside it, atomically."""
    model = relayout_model(model, False)
    default = np.dtype(jnp.dtype(dtype or model.runtime.param_dtype))
    tables = qwen3_asr_tables(model.config, projector_outside=True)
    with atomic_directory(out_dir, overwrite=overwrite, collective=True) as tmp:
        specs = write_tables(tmp, model, QWEN3_ASR_HF, tables, dtype=default, max_shard_bytes=max_shard_bytes)
        if jax.process_index() == 0:
            hf = qwen3_asr_config_to_hf(model.config, model.runtime, dtype=torch_dtype_name(specs[0].dtype))
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            if extra_files is not None:
                extra_files.copy_into(tmp)
    return Path(out_dir)


def save_qwen3_asr_checkpoint(
    model: Qwen3ASR,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    extra_files: Companions | None = None,
) -> Path:
    """Our checkpoint of the whole model: orbax `params/` (one tensor per layer) and the -hf config.json,
    whose `dtype` records what the source stored (an HF export of it defaults to it)."""
    model = relayout_model(model, False)
    with atomic_directory(out_dir, overwrite=overwrite, collective=True) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp.resolve() / PARAMS_DIR, nnx.state(model, nnx.Param))
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            hf = qwen3_asr_config_to_hf(model.config, model.runtime, dtype=dtype or model.runtime.param_dtype)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            if extra_files is not None:
                extra_files.copy_into(tmp)
    return Path(out_dir)
