"""A LoRA run on disk: reading it back (its base plus the adapters its checkpoint holds) and PEFT's adapter format.

A LoRA run's checkpoints hold the trained part only (`train.lora`); `model/lora.json` names the base it adapts
(`model.init_from`). `attach` rebuilds the adapted model from the base (`io.hf.load_adapted` reads it): adapters
added, then every parameter the checkpoint holds (adapters, any other trained ones) restored onto it;
`from_pretrained(RUN)` merges them (`models.lora.merge_adapters`), so `bidirlm export`, `embed` and `eval` see a
plain model.

`save_peft` writes what PEFT (`PeftModel.from_pretrained(AutoModel.from_pretrained(BASE), DIR)`) loads onto the
transformers model an encoder export (`bidirlm export`) gives: `adapter_config.json` (`peft_type` LORA, `r`,
`lora_alpha`, `lora_dropout`, `target_modules`) and `adapter_model.safetensors` with PEFT's keys for the
backbone (`base_model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in], `...lora_B.weight` [out, r]),
our head-split axes flattened as the weight tables flatten the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from bidirlm_jax import sharding
from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.run import lora_file
from bidirlm_jax.models import lora
from bidirlm_jax.models.layers import adapter_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_OWNERS = {"attn": "self_attn", "mlp": "mlp"}  # our block attribute -> transformers' module name


def read_record(run: str | os.PathLike) -> dict[str, Any] | None:
    """A run's `model/lora.json` (its adapters and base), or None for a run without adapters."""
    path = lora_file(run)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; the run's adapter record is damaged") from None


def settings(record: dict[str, Any]) -> lora.LoRAConfig:
    return lora.LoRAConfig(
        rank=int(record["rank"]),
        alpha=float(record["alpha"]),
        dropout=float(record.get("dropout", 0.0)),
        targets=tuple(record["targets"]),
    )


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _held(where: Path, key: str | None) -> set[str]:
    """The parameter paths an orbax tree in `where` holds (under `key`: a train state's `params`)."""
    try:
        stored = ocp.PyTreeCheckpointer().metadata(where).item_metadata
        stored = stored[key] if key else stored
        return {_path(p).removesuffix("/value") for p, _ in jax.tree_util.tree_flatten_with_path(stored)[0]}
    except Exception as e:  # orbax raises many types for a damaged checkpoint
        raise CheckpointError(f"cannot read the metadata of {where} ({type(e).__name__}: {e})") from e


def restore_trained(model: nnx.Module, where: Path, *, key: str | None = "params", mesh: Mesh | None = None):
    """`model` (in place) with every parameter the orbax tree in `where` holds (under `key`; a LoRA run's train
    state: the trained part) restored onto it."""
    held = _held(where, key)

    def target(var: nnx.Variable):
        place = sharding.variable_sharding(var, mesh) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=place))

    flat = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if _path(p) in held]
    missing = held - {_path(p) for p, _ in flat}
    if missing:
        raise CheckpointError(f"{where} holds parameters the adapted model lacks ({sorted(missing)[:3]}...)")
    abstract = jax.tree.map(target, nnx.from_flat_state(flat), is_leaf=lambda x: isinstance(x, nnx.Variable))
    item = {key: abstract} if key else abstract
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    try:
        restored = ocp.PyTreeCheckpointer().restore(where, args=args)
    except Exception as e:  # orbax and tensorstore raise many types for a damaged checkpoint
        raise CheckpointError(f"cannot restore the adapters in {where} ({type(e).__name__}: {e})") from e
    nnx.update(model, restored[key] if key else restored)
    return model


def stacked(where: Path, key: str | None = "params") -> bool:
    """Whether the tree in `where` holds its layers stacked (a run with `scan_layers=True`)."""
    return not any(p.split("/")[1].isdigit() for p in _held(where, key) if p.startswith("layers/"))


def base_of(run: Path) -> Path:
    """The checkpoint a LoRA run adapts (its `lora.json`'s `base`), checked to be there."""
    record = read_record(run) or {}
    if not record.get("base"):
        raise CheckpointError(
            f"LoRA run {run} adapted a randomly initialised model (no model.init_from), which it does not keep: "
            "only runs adapting a checkpoint can be loaded or exported"
        )
    base = Path(record["base"])
    if not (base / "config.json").is_file():
        raise CheckpointError(
            f"LoRA run {run} adapts {base}, which is gone (no config.json there); put the base checkpoint back there"
        )
    return base


def attach(model: nnx.Module, run: Path, where: Path, *, key: str | None = "params", mesh: Mesh | None = None):
    """`model` (a LoRA run's base, in place) with the run's adapters added and every parameter the tree in
    `where` holds restored onto it (`restore_trained`)."""
    lora.add_adapters(model, settings(read_record(run)), rngs=nnx.Rngs(0))
    return restore_trained(model, where, key=key, mesh=mesh)


# --- PEFT's adapter format --------------------------------------------------------------------------------


def peft_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """PEFT's state dict of `model`'s adapters (fp32), keyed for the transformers backbone (`AutoModel`)."""
    stack = lora.text_stack(model)
    scanned = stack.runtime.scan_layers
    out: dict[str, np.ndarray] = {}
    for j, block in enumerate([stack.layers] if scanned else stack.layers):
        for name, (owner, _) in lora.TARGETS.items():
            adapter = adapter_of(getattr(block, owner), name)
            if adapter is None:
                continue
            a, b = np.asarray(adapter.lora_a[...], np.float32), np.asarray(adapter.lora_b[...], np.float32)
            for i, a_i, b_i in zip(range(len(a)), a, b) if scanned else [(j, a, b)]:
                key = f"base_model.model.layers.{i}.{_OWNERS[owner]}.{name}"
                out[f"{key}.lora_A.weight"] = a_i.reshape(a_i.shape[0], -1)
                out[f"{key}.lora_B.weight"] = b_i.reshape(-1, b_i.shape[-1])
    return out


def adapter_config(adapters: lora.LoRAConfig, base: str) -> dict[str, Any]:
    """PEFT's `LoraConfig` as `adapter_config.json` stores it."""
    return {
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base,
        "r": adapters.rank,
        "lora_alpha": adapters.alpha,
        "lora_dropout": adapters.dropout,
        "target_modules": list(lora.targets_of(adapters.targets)),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_peft(
    model: nnx.Module, adapters: lora.LoRAConfig, out_dir: str | os.PathLike, *, base: str, overwrite: bool = False
) -> Path:
    """Write `model`'s adapters in PEFT's format (module doc) as one atomic directory; `base` is recorded as
    `base_model_name_or_path` (the directory PEFT users load the base from)."""
    from safetensors.numpy import save_file

    tensors = peft_tensors(model)
    if not tensors:
        raise CheckpointError("the model has no LoRA adapters to write in PEFT's format")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(adapters, base), indent=2) + "\n")
    return Path(out_dir)
