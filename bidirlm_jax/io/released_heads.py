"""The released BidirLM classifiers (`BidirLMForSequenceClassification`, `BidirLMForTokenClassification`): read
into an `EncoderWithHead`, and a fine-tuned one written in their layout.

Their layout (the authors' public BiQwen3 / BiGemma3 code): the backbone under `model.`, beside it
- sequences: `dense` (d→d, bias) → exact GELU → `classifier` (d→labels, bias), pooled by the config's
  `clf_pooling` (or `classifier_pooling`): `bos` (the first real token: their rows are unpadded first, so
  position 0 is real; our `first`), `mean`, `late` (per-token logits, then their masked mean) — our
  `eurobert` classifier exactly;
- tokens: `classifier` (d→labels, bias) on every token — our token head (`score`, `score_bias`);
- no LM head, so an untied model's head is not read (the loaded encoder ties it).
One label is regression (their `problem_type`), as ours.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io import released
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.companions import Companions
from bidirlm_jax.io.hf_config import config_from_hf, config_to_hf, read_config_dict, runtime_from_hf
from bidirlm_jax.io.layouts import TEXT, Component, Layout
from bidirlm_jax.io.shards import DEFAULT_MAX_SHARD_BYTES, torch_dtype_name
from bidirlm_jax.io.weights.load import load_state
from bidirlm_jax.io.weights.readers import open_weights
from bidirlm_jax.io.weights.save import write_tables
from bidirlm_jax.io.weights.table import Table, entry
from bidirlm_jax.io.weights.text import backbone_table
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.heads import EncoderWithHead, HeadConfig, abstract_model_with_head

HEAD_KEYS = ("dense.weight", "dense.bias", "classifier.weight", "classifier.bias")
RELEASED_HEAD = Component("released_head", ("",), released.CLASSIFIER_KEY, only=HEAD_KEYS)
LAYOUT = Layout(((TEXT, "model."), (RELEASED_HEAD, "")))
_OUR_POOLINGS = {ours: theirs for theirs, ours in released.CLF_POOLINGS.items()}
_CLASSES = {True: "BidirLMForSequenceClassification", False: "BidirLMForTokenClassification"}


def head_table(config: ModelConfig, head: HeadConfig) -> Table:
    """The head's tensors in the released layout (paths inside an `EncoderWithHead`)."""
    d, n = config.hidden_size, head.num_labels
    if not head.sequence:
        rows = [("score", "classifier.weight", (n, d)), ("score_bias", "classifier.bias", (n,))]
    else:
        rows = [("dense", "dense.weight", (d, d)), ("dense_bias", "dense.bias", (d,))]
        rows += [("classifier", "classifier.weight", (n, d)), ("classifier_bias", "classifier.bias", (n,))]
    return Table(RELEASED_HEAD, tuple(entry(("head", name), key, shape) for name, key, shape in rows))


def tables(config: ModelConfig, head: HeadConfig) -> tuple[Table, Table]:
    return backbone_table(config).under("encoder"), head_table(config, head)


def released_head_config(d: dict[str, Any], keys: set[str], where: str) -> HeadConfig:
    """The head a released classifier's config.json and tensor names describe."""
    if released.CLASSIFIER_KEY not in keys:
        raise CheckpointError(
            f"{where} holds no released classifier (no `classifier.weight`): load its encoder with from_pretrained"
        )
    labels = d.get("id2label") or {}
    num_labels = int(d.get("num_labels") or len(labels) or 2)
    if "dense.weight" not in keys:
        return HeadConfig("token_classification", num_labels)
    pooling = released.CLF_POOLINGS[released.clf_pooling(d) or "late"]  # their classes' default: late
    task = "regression" if num_labels == 1 or d.get("problem_type") == "regression" else "classification"
    return HeadConfig(task, num_labels, pooling=pooling, classifier="eurobert")


def load_released_classifier(path: str | os.PathLike, *, dtype: str = "float32") -> tuple[EncoderWithHead, list[str]]:
    """A released BidirLM classifier directory as an `EncoderWithHead` (bidirectional, as the released code runs)
    and its labels in id order (empty for regression)."""
    path = Path(path)
    d = read_config_dict(path)
    if not released.is_released(d):
        raise ConfigError(f"{path} is not a released BidirLM checkpoint (model_type {d.get('model_type')!r})")
    reader = open_weights(path)
    keys = set(reader.keys())
    head = released_head_config(d, keys, str(path))
    config = config_from_hf(d)
    config = config.replace(tie_word_embeddings=True)  # a classifier holds no LM head
    runtime = runtime_from_hf(d, dtype=dtype, param_dtype=dtype)
    model = load_state(
        abstract_model_with_head(config, head, runtime),
        reader,
        LAYOUT,
        tables(config, head),
        dtype=runtime.param_dtype,
    )
    if d.get("id2label") and head.task != "regression":
        labels = [d["id2label"][str(i)] for i in range(head.num_labels)]
    else:
        labels = [] if head.task == "regression" else [f"LABEL_{i}" for i in range(head.num_labels)]
    return model, labels


def released_classifier_config(
    model: EncoderWithHead, labels: Sequence[str] | None, *, dtype: str | None = None
) -> dict[str, Any]:
    """config.json of a classifier in the released layout; refused for a head the released classes lack."""
    head = model.head_config
    if head.sequence and head.classifier != "eurobert":
        raise ConfigError(
            "the released BidirLM classifiers are dense → GELU → classifier (our eurobert classifier); a linear probe "
            "has no released class: fine-tune with --config.finetune.classifier=eurobert, or export --format transformers"
        )
    if head.sequence and head.pooling not in _OUR_POOLINGS:
        raise ConfigError(
            f"the released classifiers pool bos | mean | late (our first | mean | late), not {head.pooling!r}; "
            "export --format transformers"
        )
    d = released.to_released(
        config_to_hf(model.config, model.runtime, dtype=dtype), architecture=_CLASSES[head.sequence]
    )
    names = ["LABEL_0"] if head.task == "regression" else list(labels or [f"LABEL_{i}" for i in range(head.num_labels)])
    if len(names) != head.num_labels or len(set(names)) != len(names):
        raise ConfigError(f"labels {names} do not name the head's {head.num_labels} outputs once each")
    d.update(id2label={str(i): n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
    d["num_labels"] = head.num_labels
    if head.sequence:
        theirs = _OUR_POOLINGS[head.pooling]
        d.update({key: theirs for key in released.POOLING_KEYS})  # either spelling the released code reads
        d["problem_type"] = "regression" if head.task == "regression" else "single_label_classification"
    return d


def export_released_classifier(
    model: EncoderWithHead,
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    extra_files: Companions | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write `model` as a released BidirLM classifier directory (`AutoModelFor…Classification` with
    `trust_remote_code=True` loads it); checked before writing, atomic; every process calls it in a
    multi-process run (process 0 writes)."""
    if not isinstance(model, EncoderWithHead):
        raise ConfigError(f"export_released_classifier needs an EncoderWithHead, got {type(model).__name__}")
    default = np.dtype(jnp.dtype(dtype or model.runtime.param_dtype))
    d = released_classifier_config(model, labels, dtype=torch_dtype_name(default))
    with atomic_directory(out_dir, overwrite=overwrite, collective=True) as tmp:
        write_tables(
            tmp,
            model,
            LAYOUT,
            tables(model.config, model.head_config),
            dtype=default,
            max_shard_bytes=max_shard_bytes,
        )
        if jax.process_index() == 0:
            (tmp / "config.json").write_text(json.dumps(d, indent=2) + "\n")
            if extra_files is not None:
                extra_files.copy_into(tmp)
    return Path(out_dir)
