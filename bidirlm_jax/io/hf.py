"""Hugging Face checkpoint directory <-> Flax NNX model, one tensor at a time.

`weight_table` is the single key table: for every parameter of our model, the transformers key that
holds it and the reshape between the two layouts. Loading reads each tensor lazily,
checks its shape, converts it and places it on device (in its mesh sharding when a mesh is given)
before reading the next; saving streams tensors into shards the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from bidirlm_jax import sharding
from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.checkpoint import is_checkpoint, load_checkpoint
from bidirlm_jax.io.hf_config import config_to_hf, read_config, read_runtime
from bidirlm_jax.io.layouts import CAUSAL_LM, LM_HEAD, Layout, detect_layout
from bidirlm_jax.io.run import description_dir, is_training_run
from bidirlm_jax.io.shards import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardReader,
    ShardWriter,
    TensorInfo,
    TensorSpec,
    has_safetensors,
    torch_dtype_name,
)
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
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
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers some old checkpoints saved


@dataclass(frozen=True)
class WeightEntry:
    """One parameter: its path in our model and its transformers key. Our parameters keep transformers'
    `[out, in]` order with heads split out, so the two layouts differ by a reshape (no copy)."""

    path: tuple
    hf_key: str  # backbone-relative (see io.layouts)
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]

    def to_ours(self, array):
        return array.reshape(self.shape)

    def to_hf(self, array):
        return array.reshape(self.hf_shape)


def weight_table(config: ModelConfig) -> list[WeightEntry]:
    d, f, h, kv, hd = (
        config.hidden_size,
        config.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
    )
    entries = []

    def add(path, key, hf_shape, shape=None):
        entries.append(WeightEntry(path, key, hf_shape, shape or hf_shape))

    add(("embedder", "embedding"), "embed_tokens.weight", (config.vocab_size, d))
    norms = {"attn_norm": "input_layernorm"}
    if config.post_norms:
        norms.update(
            post_attn_norm="post_attention_layernorm",
            mlp_norm="pre_feedforward_layernorm",
            post_mlp_norm="post_feedforward_layernorm",
        )
    else:
        norms.update(mlp_norm="post_attention_layernorm")
    for i in range(config.num_layers):
        p = f"layers.{i}."
        for ours, theirs in norms.items():
            add(("layers", i, ours, "weight"), f"{p}{theirs}.weight", (d,))
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            add(
                ("layers", i, "attn", f"{name}_proj"),
                f"{p}self_attn.{name}_proj.weight",
                (heads * hd, d),
                (heads, hd, d),
            )
            if config.attention_bias:
                add(("layers", i, "attn", f"{name}_bias"), f"{p}self_attn.{name}_proj.bias", (heads * hd,), (heads, hd))
        add(("layers", i, "attn", "o_proj"), f"{p}self_attn.o_proj.weight", (d, h * hd), (d, h, hd))
        if config.attention_bias:
            add(("layers", i, "attn", "o_bias"), f"{p}self_attn.o_proj.bias", (d,))
        for name in ("q_norm", "k_norm") if config.qk_norm else ():
            add(("layers", i, "attn", name, "weight"), f"{p}self_attn.{name}.weight", (hd,))
        add(("layers", i, "mlp", "gate_proj"), f"{p}mlp.gate_proj.weight", (f, d))
        add(("layers", i, "mlp", "up_proj"), f"{p}mlp.up_proj.weight", (f, d))
        add(("layers", i, "mlp", "down_proj"), f"{p}mlp.down_proj.weight", (d, f))
    add(("final_norm", "weight"), "norm.weight", (d,))
    if not config.tie_word_embeddings:
        add(("lm_head",), LM_HEAD, (config.vocab_size, d))
    return entries


# --- reading ------------------------------------------------------------------------------------


class _PickleReader:
    """`pytorch_model.bin` (single or sharded), read with `torch.load(weights_only=True)`; also behind
    `ShardReader`'s `info`/`read_flat`, which the streamed merge reads through (torch memory-maps the file)."""

    def __init__(self, path: Path):
        try:
            import torch  # optional dependency, only for pickled checkpoints
        except ImportError as e:
            raise CheckpointError(
                f"{path} holds pickled PyTorch weights: install torch (pip install torch) to read pytorch_model.bin, "
                "or convert them to safetensors first"
            ) from e

        index = path / "pytorch_model.bin.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else ["pytorch_model.bin"]
        )
        self._path = path
        self._tensors: dict[str, Any] = {}
        for name in files:
            try:
                self._tensors.update(torch.load(path / name, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # torch raises many types for a bad pickle
                raise CheckpointError(f"cannot read {path / name} as a PyTorch checkpoint: {e}") from e
        self._position = {key: i for i, key in enumerate(self._tensors)}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(jnp.dtype(str(self._tensors[name].dtype).removeprefix("torch.")))

    def get(self, name: str) -> np.ndarray:
        import ml_dtypes
        import torch

        t = self._tensors[name]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def info(self, name: str) -> TensorInfo:
        """The tensor's record; its `offset` is the tensor's position in the checkpoint (only the order is used)."""
        array = self.get(name)  # a view of the memory map: nothing is read
        return TensorInfo(tuple(array.shape), array.dtype, self._path, self._position[name])

    def read_flat(
        self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        piece = self.get(name).reshape(-1)[start:stop]
        if out is None:
            return piece.copy()
        out[...] = piece
        return out


def open_weights(path: str | os.PathLike, *, allow_pickle: bool = False) -> ShardReader | _PickleReader:
    path = user_path(path)
    if has_safetensors(path):
        return ShardReader(path)
    if (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{path} only has pickled PyTorch weights (pytorch_model.bin), which can run code when loaded; "
                "pass --allow-pickle (allow_pickle=True) to read them with torch.load(weights_only=True), "
                "or convert them to safetensors first"
            )
        return _PickleReader(path)
    if is_checkpoint(path):
        kind = "training run" if is_training_run(path) else "checkpoint (orbax)"
        raise CheckpointError(
            f"{path} is a bidirlm {kind}, which this reads as safetensors only once converted: run "
            f"`bidirlm convert {path} {path.name}-hf` first and use that directory"
        )
    raise CheckpointError(
        f"no weights in {path}: expected model.safetensors, a sharded safetensors index or pytorch_model.bin"
    )


def iter_weights(reader, layout: Layout, config: ModelConfig) -> Iterator[tuple[WeightEntry, np.ndarray]]:
    """Yield (entry, tensor in our layout), after checking the checkpoint has exactly what the config needs."""
    table = weight_table(config)
    wanted = {e.hf_key: e for e in table}
    present = {}
    for key in reader.keys():
        canonical = layout.to_canonical(key)
        if canonical is None or _IGNORED.search(key):
            continue  # outside the text backbone (vision/audio towers) or a recomputed buffer
        present[canonical] = key
    unknown = sorted(set(present) - set(wanted) - ({LM_HEAD} if config.tie_word_embeddings else set()))
    missing = sorted(set(wanted) - set(present))
    if unknown or missing:
        raise CheckpointError(
            "checkpoint does not match its config.json: "
            + (f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} " if missing else "")
            + (f"unexpected tensors {unknown[:8]}{' ...' if len(unknown) > 8 else ''} " if unknown else "")
            + "— check that config.json belongs to these weights"
        )
    bad = [
        f"{present[e.hf_key]}: {reader.shape(present[e.hf_key])} but config.json needs {e.hf_shape}"
        for e in table
        if reader.shape(present[e.hf_key]) != e.hf_shape
    ]
    if bad:
        raise CheckpointError("tensor shapes disagree with config.json: " + "; ".join(bad[:8]))
    for entry in table:
        yield entry, entry.to_ours(reader.get(present[entry.hf_key]))


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
    layout = detect_layout(reader.keys())
    graphdef, state = abstract_model(config, runtime)
    flat = dict(nnx.to_flat_state(state))
    dtype = jnp.dtype(runtime.param_dtype)
    for entry, array in tqdm(
        iter_weights(reader, layout, config), desc="loading", total=len(flat), leave=False, disable=None
    ):
        var = flat[entry.path]
        array = np.asarray(array).astype(dtype, copy=False)
        if mesh is None:
            value = jax.device_put(array)
        else:
            target = sharding.variable_sharding(var, mesh)
            value = jax.make_array_from_callback(array.shape, target, lambda idx, a=array: a[idx])
        flat[entry.path] = var.replace(value)
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def from_pretrained(
    path: str | os.PathLike,
    *,
    attention: str | None = None,
    bidirectional_window: str | None = None,
    dtype: str = "float32",
    runtime: Runtime | None = None,
    mesh: Mesh | None = None,
    allow_pickle: bool = False,
) -> Transformer:
    """Load an HF checkpoint directory, a bidirlm checkpoint (`bidirlm convert`) or a training run (its
    latest step) as a model.

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
    config = read_config(where)
    if is_checkpoint(path):
        return load_checkpoint(path, config, runtime, mesh=mesh)
    return load_params(path, config, runtime, mesh=mesh, allow_pickle=allow_pickle)


# --- writing ------------------------------------------------------------------------------------


def _param_arrays(model: Transformer) -> dict[tuple, jax.Array]:
    return {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole array on this host; a collective when other processes hold parts of it."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


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
    arrays = _param_arrays(model)
    table = weight_table(config)
    default = np.dtype(jnp.dtype(dtype or model.runtime.param_dtype))
    tensor_dtypes = tensor_dtypes or {}
    specs = [
        TensorSpec(
            CAUSAL_LM.to_checkpoint(e.hf_key), e.hf_shape, np.dtype(jnp.dtype(tensor_dtypes.get(e.hf_key, default)))
        )
        for e in table
    ]
    writes = jax.process_index() == 0
    with atomic_directory(out_dir, overwrite=overwrite, collective=True) as tmp:
        writer = ShardWriter(tmp, specs, max_shard_bytes=max_shard_bytes) if writes else None
        for entry, spec in zip(table, specs):
            host = _to_host(arrays[entry.path])
            if writer is not None:
                writer.write(spec.name, entry.to_hf(host).astype(spec.dtype, copy=False))
        if writer is not None:
            writer.close()
            hf = config_to_hf(config, model.runtime, dtype=torch_dtype_name(specs[0].dtype))  # the embedding's (first)
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
