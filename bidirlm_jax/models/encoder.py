"""Model inputs → one pooled embedding per text: the single path GradCache, `encode`, the task heads and the
export share, so an embedding never depends on which of them computed it.

Inputs are a mapping, not fixed arguments: the text keys (`input_ids`, `attention_mask`, `segment_ids`,
`positions`) and the towers' row-aligned keys (`data.media.collate`: `pixel_values` and its layout,
`input_features`, `audio_lengths`), all in `MODEL_INPUTS`. A model with towers computes a batch through its
own `batch_hidden_states(inputs)`, so GradCache, `encode` and the heads need no per-model code. A batch that holds
several kinds of text (a contrastive batch's queries and documents) names them by role prefix:
`role_input_ids`, …, with the legacy short names `role_ids` / `role_mask` (`role_inputs`).

Two layouts pool to the same embeddings (`models.pooling`):
- padded: one text per row, `attention_mask` marks its tokens (either padding side);
- packed: several texts per row back to back (no padding FLOPs), `segment_ids` numbering each token's
  text 1..N across the whole batch (0 = padding) and `positions` restarting at 0 per text, so no token
  attends across texts and each sees the positions it has alone; `num_texts=N` asks for `[N, d]`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from bidirlm_jax.models.pooling import pool, pool_segments
from bidirlm_jax.models.transformer import Transformer

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "segment_ids",
    "positions",
    "pixel_values",
    "vision_coords",
    "vision_interp_index",
    "vision_interp_weight",
    "vision_lengths",
    "input_features",
    "audio_lengths",
)
_SHORT_NAMES = {"ids": "input_ids", "mask": "attention_mask"}  # a role's legacy batch keys (`query_ids`, …)

Inputs = Mapping[str, jax.Array]


def role_inputs(batch: Mapping[str, jax.Array], role: str) -> dict[str, jax.Array]:
    """The model inputs of one role of a batch (`query`, `positive`, …): `{role}_{key}` for every key of
    `MODEL_INPUTS`, or its short name (`{role}_ids`, `{role}_mask`)."""
    short = {v: k for k, v in _SHORT_NAMES.items()}
    out = {}
    for key in MODEL_INPUTS:
        for name in (f"{role}_{key}", f"{role}_{short.get(key, key)}"):
            if name in batch:
                out[key] = jnp.asarray(batch[name])
                break
    return out


def hidden_states(model: Transformer, inputs: Inputs) -> jax.Array:
    """Final-normed hidden states [B, T, d] of a mapping of model inputs."""
    if hasattr(model, "batch_hidden_states"):  # a model with towers (row-aligned media inputs)
        return model.batch_hidden_states(inputs)
    return model.hidden_states(
        inputs["input_ids"],
        inputs.get("attention_mask"),
        segment_ids=inputs.get("segment_ids"),
        positions=inputs.get("positions"),
    )


def embedding_size(model: Transformer) -> int:
    """Width of the model's embeddings (the text stack's, for models with towers)."""
    config = model.config
    return getattr(config, "text", config).hidden_size


def pool_inputs(values: jax.Array, inputs: Inputs, mode: str, *, num_texts: int | None = None) -> jax.Array:
    """Per-token `values` [B, T, ...] pooled per text of `inputs`: fp32 [B, ...] (padded) or [num_texts, ...]
    (packed)."""
    if num_texts is not None:
        return pool_segments(values, inputs["segment_ids"], num_texts, mode)
    mask = inputs.get("attention_mask")
    return pool(values, jnp.ones(values.shape[:2], jnp.int32) if mask is None else mask, mode)


def pooled_embeddings(
    model: Transformer, inputs: Inputs, pooling: str = "mean", *, num_texts: int | None = None
) -> jax.Array:
    """One fp32 embedding per text of `inputs`: [B, d] padded, [num_texts, d] packed."""
    return pool_inputs(hidden_states(model, inputs), inputs, pooling, num_texts=num_texts)
