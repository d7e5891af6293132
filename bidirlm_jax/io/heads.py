"""Fine-tuned models (encoder + task head) on disk: the run's head description, reading a fine-tuning run
back, and exports to transformers' own classes (no remote code).

Which heads transformers can load (transformers 5.24):

| our head | Gemma3 | Qwen3 |
|---|---|---|
| classification / regression, `linear`, pooling `last` | `Gemma3TextForSequenceClassification` | `Qwen3ForSequenceClassification` |
| token classification | — (transformers has no Gemma3 token classifier) | `Qwen3ForTokenClassification` |
| `linear`, pooling `mean`, `first` | — | — |
| `eurobert` (the authors' head), any pooling | sentence-transformers (`io.st_heads`) | sentence-transformers |

transformers' sequence classifiers (`GenericForSequenceClassification`) score the *last* position and
take, per row, the rightmost token whose id is not `pad_token_id` — with left or right padding. That is
our `last` pooling (the last position the attention mask marks real) as long as padding carries
`pad_token_id` and a text's last real token is not the pad token, so the export writes the tokenizer's
pad id into config.json and `export_finetuned` refuses a tokenizer that ends texts with it. Their
`score` has no bias, as ours. Their token classifier is dropout + `score` (with bias) on every token, as
ours. A linear probe with another pooling has no transformers class: the export refuses it; save the
encoder (`save_pretrained(model.encoder, dir)`) and keep the head in JAX, or fine-tune with `pooling=last`.
The authors' head (dense → GELU → classifier) has no transformers class on these backbones either;
`export_finetuned` writes it as a sentence-transformers model of stock modules (`io.st_heads`).

A fine-tuning run keeps `model/head.json` (`describe`: the head and its label map) beside its config
and tokenizer, and its best validation step in `best/` (`save_best`: params + `best.json`);
`load_finetuned` reads either that or any committed training step, `export_finetuned` exports it.

Keys: the backbone under `model.` (the classes' `base_model_prefix`), the head as `score.weight`
(+ `score.bias` for tokens); the LM head is not part of these classes and is not written. config.json
is `io.hf_config.config_to_hf`'s (the attention mode, bidirectional flags included) plus
`architectures`, `id2label` / `label2id`, `problem_type` and `pad_token_id`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from bidirlm_jax import sharding
from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.atomic import atomic_directory, check_destination
from bidirlm_jax.io.companions import ENCODER_MODULES, Companions, companion_files
from bidirlm_jax.io.families import SEQUENCE_CLASSES, TOKEN_CLASSES
from bidirlm_jax.io.hf import from_pretrained
from bidirlm_jax.io.hf_config import config_to_hf, read_config, read_config_dict, read_runtime
from bidirlm_jax.io.lora import attach, base_of, read_record
from bidirlm_jax.io.model_types import TEXT_TYPE, described_type
from bidirlm_jax.io.run import (
    HEAD_FILE,
    best_dir,
    best_file,
    best_params_dir,
    checkpoints_dir,
    head_file,
    model_dir,
    state_dir,
)
from bidirlm_jax.io.shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter, TensorSpec, torch_dtype_name
from bidirlm_jax.io.weights.save import param_arrays, to_host
from bidirlm_jax.io.weights.text import backbone_table
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.heads import EncoderWithHead, HeadConfig, abstract_model_with_head, attach_head
from bidirlm_jax.models.lora import merge_adapters

BACKBONE_PREFIX = "model."


# --- the run's head description -------------------------------------------------------------------


def describe(head: HeadConfig, label_map, **extra: Any) -> dict[str, Any]:
    """The JSON a fine-tuning run records beside its config (`model/head.json`): the head, the label map
    (`labels` in id order, transformers' `id2label` / `label2id`) and `extra` settings (max length...)."""
    if head.task != label_map.task or head.num_labels != label_map.num_labels:
        raise ConfigError(
            f"the head ({head.task}, {head.num_labels} outputs) disagrees with the label map "
            f"({label_map.task}, {label_map.num_labels} labels {list(label_map.names)})"
        )
    return {"head": head.to_json(), **label_map.to_json(), **extra}


def read_description(path: str | os.PathLike) -> dict[str, Any]:
    """A `head.json` (or the run / model directory holding one), checked."""
    path = Path(path)
    for candidate in (head_file(path), path / HEAD_FILE, path):
        if candidate.is_file():
            path = candidate
            break
    else:
        raise ConfigError(f"no {HEAD_FILE} at {path}: not a fine-tuning run (bidirlm train with configs/finetune.py)")
    try:
        d = json.loads(path.read_text())
        head = HeadConfig.from_json(d["head"])
        labels = list(d.get("labels") or [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a readable head description: {e!r}") from None
    if head.task != "regression" and len(labels) != head.num_labels:
        raise ConfigError(f"{path}: the head has {head.num_labels} outputs but {len(labels)} labels {labels}")
    return {**d, "head": head.to_json(), "labels": labels}


# --- exports to transformers' classes -------------------------------------------------------------


def hf_class_name(config: ModelConfig, head: HeadConfig) -> str:
    """The transformers class a head exports to; `ConfigError` (saying why and what to do) when none does."""
    if head.task == "token_classification":
        if config.family not in TOKEN_CLASSES:
            raise ConfigError(
                f"transformers has no {config.family} token-classification class to export to (only "
                f"{', '.join(TOKEN_CLASSES.values())}); save the encoder with save_pretrained(model.encoder, DIR) "
                "and keep the head in JAX"
            )
        return TOKEN_CLASSES[config.family]
    if head.classifier == "eurobert":
        raise ConfigError(
            "the eurobert classifier (dense → GELU → classifier) has no transformers class on a "
            f"{config.family} backbone; export it with io.st_heads.export_st_classifier (export_finetuned does) "
            "as a sentence-transformers model, or fine-tune with --config.finetune.classifier=linear "
            "--config.finetune.pooling=last"
        )
    if head.pooling != "last":
        raise ConfigError(
            f"pooling {head.pooling!r} has no transformers class: {SEQUENCE_CLASSES[config.family]} scores the last "
            "non-padding token only (our pooling 'last'). Fine-tune with --config.finetune.pooling=last to export, "
            "or save the encoder with save_pretrained(model.encoder, DIR) and keep the head in JAX"
        )
    return SEQUENCE_CLASSES[config.family]


def _head_tensors(model: EncoderWithHead) -> list[tuple[str, jax.Array]]:
    tensors = [("score.weight", model.head.score[...])]
    if model.head_config.task == "token_classification":
        tensors.append(("score.bias", model.head.score_bias[...]))
    return tensors


def hf_head_config(
    model: EncoderWithHead, *, labels: Sequence[str] | None, pad_token_id: int | None, dtype: str | None = None
) -> dict[str, Any]:
    """config.json of the export (see the module doc)."""
    config, head = model.config, model.head_config
    class_name = hf_class_name(config, head)
    d = config_to_hf(config, model.runtime, dtype=dtype)
    if head.task == "regression":
        names = ["LABEL_0"]
        d["problem_type"] = "regression"
    else:
        names = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(head.num_labels)]
        if len(names) != head.num_labels:
            raise ConfigError(
                f"{len(names)} labels {names} for a head with {head.num_labels} outputs; give the run's label map"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"labels {names} name a class twice")
        if head.task == "classification":
            d["problem_type"] = "single_label_classification"
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None and head.task != "token_classification":
        raise ConfigError(
            f"{class_name} finds each row's last token through pad_token_id, which neither the model config nor the "
            "call gives; pass pad_token_id=(the tokenizer's pad id)"
        )
    d.update(
        architectures=[class_name],
        id2label={str(i): n for i, n in enumerate(names)},
        label2id={n: i for i, n in enumerate(names)},
        pad_token_id=pad,
    )
    if head.task == "token_classification":
        d.update(classifier_dropout=head.dropout, token_classification_bias=True)
    return d


def export_classifier(
    model: EncoderWithHead,
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    pad_token_id: int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    extra_files: Companions | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write an HF directory that transformers loads as its own classifier class (see the module doc).

    Everything is checked before the first byte is written; the directory appears atomically. In a
    multi-process run every process calls this (tensors are gathered to process 0, which writes).
    """
    if not isinstance(model, EncoderWithHead):
        raise ConfigError(f"export_classifier needs an EncoderWithHead, got {type(model).__name__}")
    config = model.config
    default = np.dtype(jnp.dtype(dtype or model.runtime.param_dtype))
    hf = hf_head_config(model, labels=labels, pad_token_id=pad_token_id, dtype=torch_dtype_name(default))
    arrays = param_arrays(model.encoder)
    table = backbone_table(config).entries
    head = _head_tensors(model)
    specs = [TensorSpec(BACKBONE_PREFIX + e.hf_key, e.hf_shape, default) for e in table]
    specs += [TensorSpec(name, tuple(a.shape), default) for name, a in head]
    writes = jax.process_index() == 0
    with atomic_directory(out_dir, overwrite=overwrite, collective=True) as tmp:
        writer = ShardWriter(tmp, specs, max_shard_bytes=max_shard_bytes) if writes else None
        sources = [(e.to_hf, arrays[e.path]) for e in table] + [(lambda x: x, a) for _, a in head]
        for spec, (to_hf, array) in zip(specs, sources):
            host = to_host(array)
            if writer is not None:
                writer.write(spec.name, to_hf(host).astype(spec.dtype, copy=False))
        if writer is not None:
            writer.close()
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            if extra_files is not None:
                extra_files.copy_into(tmp)
    return Path(out_dir)


# --- fine-tuning runs -------------------------------------------------------------------------------


def save_best(run: str | os.PathLike, params: nnx.State, *, step: int, metrics: Mapping[str, float]) -> Path:
    """Record a run's best validation step: `RUN/best/params` (orbax, the `EncoderWithHead` parameters, each
    process writing its shards) and `RUN/best/best.json` (`{"step", "metrics"}`), replacing the previous best
    atomically. Every process calls this (a collective, like the train state's saves)."""
    with atomic_directory(best_dir(run), overwrite=True, collective=True) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp.resolve() / best_params_dir(run).name, params)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            record = {"step": int(step), "metrics": {k: float(v) for k, v in metrics.items()}}
            (tmp / best_file(run).name).write_text(json.dumps(record, indent=2) + "\n")
    return best_dir(run)


def read_best(run: str | os.PathLike) -> dict[str, Any] | None:
    """`{"step", "metrics"}` of the run's recorded best step, or None when none was recorded."""
    path = best_file(run)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _restore(where: Path, abstract: nnx.State, *, train_state: bool) -> nnx.State:
    try:
        if not train_state:
            return ocp.StandardCheckpointer().restore(where, abstract)
        item = {"params": abstract}
        args = ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        )
        return ocp.PyTreeCheckpointer().restore(where, args=args)["params"]
    except Exception as e:  # orbax and tensorstore raise many types for a damaged or foreign checkpoint
        detail = (str(e).splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"cannot restore {where} ({type(e).__name__}: {detail}); the checkpoint is damaged or its head does "
            f"not match {HEAD_FILE}"
        ) from e


def load_finetuned(
    run: str | os.PathLike, *, step: int | str = "best", mesh: Mesh | None = None
) -> tuple[EncoderWithHead, dict[str, Any]]:
    """A fine-tuning run's model and its head description (`head.json`, plus `step`: the step read).

    `step`: `"best"` (the best validation step `save_best` recorded; the latest step when none was),
    `"latest"` (the latest committed training step) or a committed step number. Only parameters are read
    (not the optimizer state), into `mesh`'s shardings when given."""
    run = Path(run).resolve()
    description = read_description(run)
    kind = described_type(read_config_dict(model_dir(run)))  # a text model, or one with towers
    config, runtime = kind.read(read_config_dict(model_dir(run))), read_runtime(model_dir(run))
    head = HeadConfig.from_json(description["head"])
    graphdef, abstract = abstract_model_with_head(config, head, runtime, kind.model_class)

    def target(var):
        where = sharding.variable_sharding(var, mesh) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=where))

    abstract = jax.tree.map(target, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    best = read_best(run) if step == "best" else None
    if best is not None:
        where, train_state, step = best_params_dir(run), False, int(best["step"])
    else:
        steps = ocp.utils.checkpoint_steps(checkpoints_dir(run)) if checkpoints_dir(run).is_dir() else []
        if not steps:
            raise CheckpointError(
                f"fine-tuning run {run} has no committed checkpoint yet; train it for more steps first"
            )
        if step in ("best", "latest"):
            step = max(steps)
        if step not in steps:
            raise CheckpointError(f"fine-tuning run {run} has no committed step {step} (it has {sorted(steps)})")
        where, train_state = state_dir(run, step), True
    if read_record(run) is not None:  # LoRA: the base it adapts, a head, the adapters merged in
        encoder = from_pretrained(base_of(run), runtime=runtime, mesh=mesh, text_only=True)
        model = attach(attach_head(encoder, head), run, where, key="params" if train_state else None, mesh=mesh)
        return merge_adapters(model), {**description, "step": int(step)}
    params = _restore(where, abstract, train_state=train_state)
    return nnx.merge(graphdef, params), {**description, "step": int(step)}


def check_last_token(tokenizer, pad_token_id: int) -> None:
    """Refuse a tokenizer that ends texts with the pad token: transformers' last-token pooling would skip it."""
    ids = tokenizer("a")["input_ids"]
    if ids and ids[-1] == pad_token_id:
        raise ConfigError(
            f"the tokenizer ends every text with token {pad_token_id}, which is also its pad token: transformers' "
            "sequence classifiers would pool the token before it, our 'last' pooling this one. Give the tokenizer a "
            "distinct pad token before fine-tuning"
        )


def export_finetuned(
    run: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: int | str = "best",
    dtype: str | None = None,
    overwrite: bool = False,
    format: str = "transformers",
) -> Path:
    """A fine-tuning run (`bidirlm train --config configs/finetune.py`) → transformers classifier directory
    (a sentence-transformers one for the eurobert head; a released BidirLM classifier with `format="bidirlm"`,
    `io.released_heads`), with the run's tokenizer and label map; `step` as `load_finetuned` takes it
    (default: the best one)."""
    from bidirlm_jax.io.released_heads import export_released_classifier
    from bidirlm_jax.io.st_heads import export_st_classifier
    from bidirlm_jax.io.tokenizer import load_tokenizer, pad_id

    run = Path(run)
    description = read_description(run)
    if described_type(read_config_dict(model_dir(run))) is not TEXT_TYPE:
        raise ConfigError(
            f"{run} fine-tuned a model with vision/audio towers; no transformers class holds such a classifier, so "
            "it is not exported: use it in JAX (io.heads.load_finetuned), or export its encoder"
        )
    config = read_config(model_dir(run))
    head = HeadConfig.from_json(description["head"])
    labels = description["labels"] or None
    if format == "bidirlm":
        check_destination(out_dir, overwrite=overwrite)
        model, _ = load_finetuned(run, step=step)  # the export refuses a head the released classes lack
        files = companion_files(run)
        return export_released_classifier(
            model, out_dir, labels=labels, dtype=dtype, overwrite=overwrite, extra_files=files
        )
    if head.classifier == "eurobert":  # the authors' head: a sentence-transformers model (io.st_heads)
        check_destination(out_dir, overwrite=overwrite)
        model, _ = load_finetuned(run, step=step)
        return export_st_classifier(
            model,
            out_dir,
            labels=labels,
            max_length=int(description.get("max_length", 512)),
            dtype=dtype,
            overwrite=overwrite,
            extra_files=companion_files(run, owned=ENCODER_MODULES),
        )
    hf_class_name(config, head)  # refuse before reading any weight
    check_destination(out_dir, overwrite=overwrite)
    tokenizer = load_tokenizer(model_dir(run))
    pad = pad_id(tokenizer)
    if head.task != "token_classification":
        check_last_token(tokenizer, pad)
    model, _ = load_finetuned(run, step=step)
    return export_classifier(
        model,
        out_dir,
        labels=labels,
        pad_token_id=pad,
        dtype=dtype,
        overwrite=overwrite,
        extra_files=companion_files(run),
    )
