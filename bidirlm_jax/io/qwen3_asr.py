"""Qwen3-ASR checkpoints: reading transformers' -hf layout, the original `thinker.*` one (and the AuT tower
of any layout `io.layouts` knows) into a `Qwen3ASR`, writing the -hf layout that transformers loads as
`Qwen3ASRForConditionalGeneration`, and the project's own (orbax) checkpoints of the whole model.

The text backbone and LM head go through the text tables, the tower through `io.weights.audio`, all in one
generic read or write; HF files and checkpoints hold one tensor per layer (scanned parts are stacked after).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
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
from bidirlm_jax.io.checkpoint import PARAMS_DIR
from bidirlm_jax.io.hf_config_audio import is_qwen3_asr, qwen3_asr_config_from_hf, qwen3_asr_config_to_hf
from bidirlm_jax.io.layouts import AUDIO, AUDIO_PROJECTOR, HEAD, QWEN3_ASR_HF, TEXT, detect_layout
from bidirlm_jax.io.run import is_training_run
from bidirlm_jax.io.shards import DEFAULT_MAX_SHARD_BYTES, torch_dtype_name
from bidirlm_jax.io.weights.audio import audio_tables
from bidirlm_jax.io.weights.load import load_state
from bidirlm_jax.io.weights.readers import open_weights
from bidirlm_jax.io.weights.save import write_tables
from bidirlm_jax.io.weights.table import Table
from bidirlm_jax.io.weights.text import text_tables
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


def _unrolled(config: Qwen3ASRConfig) -> Qwen3ASRConfig:
    return config.replace(text=config.text.replace(scan_layers=False), audio=config.audio.replace(scan_layers=False))


def relayout_model(model: Qwen3ASR, config: Qwen3ASRConfig) -> Qwen3ASR:
    """`model` with its text and audio layers scanned or unrolled as `config` says (arrays restacked)."""
    audio_state = nnx.state(model.audio_tower)
    if model.config.audio.scan_layers != config.audio.scan_layers:
        audio_state = stack_layers(audio_state) if config.audio.scan_layers else unstack_layers(audio_state)
    text = relayout(model.text, config.text.scan_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen3ASR(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.State({"text": nnx.state(text), "audio_tower": audio_state}))


def load_qwen3_asr(
    path: Path,
    *,
    mesh: Mesh | None = None,
    allow_pickle: bool = False,
    audio_run: Mapping[str, Any] = (),
    **text_run: Any,
) -> Qwen3ASR:
    """A `Qwen3ASR` from an HF directory (-hf or `thinker.*` layout) or one of our checkpoints of it;
    `text_run` are the text config's run overrides (dtype, attention, scan_layers), `audio_run` the tower's."""
    if is_training_run(path):
        raise CheckpointError(f"{path} is a training run of a Qwen3-ASR model, which cannot be read yet; "
                              "load its exported HF directory instead")  # fmt: skip
    shared = {k: text_run[k] for k in ("dtype", "param_dtype", "scan_layers") if k in text_run}  # both parts run so
    config = qwen3_asr_config_from_hf(read_json(path), audio_run={**shared, **dict(audio_run)}, **text_run)
    if (path / PARAMS_DIR).is_dir():
        model = _restore(path, _unrolled(config), mesh)
    else:
        reader = open_weights(path, allow_pickle=allow_pickle)
        layout = detect_layout(reader.keys(), (TEXT, HEAD, AUDIO, AUDIO_PROJECTOR))
        if layout.prefix(AUDIO) is None:
            raise CheckpointError(
                f"{path}'s config.json describes Qwen3-ASR but its weights hold no audio tower (`audio_tower.conv2d1."
                "weight` under any known prefix); load the text backbone alone with text_only=True"
            )
        tables = qwen3_asr_tables(_unrolled(config), projector_outside=layout.prefix(AUDIO_PROJECTOR) is not None)
        abstract = nnx.split(nnx.eval_shape(lambda: Qwen3ASR(_unrolled(config), rngs=nnx.Rngs(0))))
        model = load_state(abstract, reader, layout, tables, dtype=config.text.param_dtype, mesh=mesh)
    if config.text.scan_layers or config.audio.scan_layers:
        model = sharding.place(relayout_model(model, config), mesh)
    return model


def _restore(path: Path, config: Qwen3ASRConfig, mesh: Mesh | None) -> Qwen3ASR:
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3ASR(config, rngs=nnx.Rngs(0))))
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
    extra_files: Iterable[Path] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the -hf layout transformers loads as `Qwen3ASRForConditionalGeneration` (tensors in `dtype`,
    default the parameters'), with `extra_files` (tokenizer, preprocessor_config.json) beside it, atomically."""
    config = _unrolled(model.config)
    model = relayout_model(model, config)
    default = np.dtype(jnp.dtype(dtype or config.text.param_dtype))
    with atomic_directory(out_dir, overwrite=overwrite, collective=True) as tmp:
        specs = write_tables(tmp, model, QWEN3_ASR_HF, qwen3_asr_tables(config, projector_outside=True),
                             dtype=default, max_shard_bytes=max_shard_bytes)  # fmt: skip
        if jax.process_index() == 0:
            hf = qwen3_asr_config_to_hf(config, dtype=torch_dtype_name(specs[0].dtype))
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            for file in extra_files:
                shutil.copy2(file, tmp / Path(file).name)
    return Path(out_dir)


def save_qwen3_asr_checkpoint(
    model: Qwen3ASR,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    extra_files: Iterable[Path] = (),
) -> Path:
    """Our checkpoint of the whole model: orbax `params/` (one tensor per layer) and the -hf config.json,
    whose `dtype` records what the source stored (an HF export of it defaults to it)."""
    config = _unrolled(model.config)
    model = relayout_model(model, config)
    with atomic_directory(out_dir, overwrite=overwrite, collective=True) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp.resolve() / PARAMS_DIR, nnx.state(model, nnx.Param))
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            hf = qwen3_asr_config_to_hf(config, dtype=dtype or config.text.param_dtype)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            for file in extra_files:
                shutil.copy2(file, tmp / Path(file).name)
    return Path(out_dir)
