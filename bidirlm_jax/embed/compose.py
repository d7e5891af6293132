"""Composed inputs (an image or a clip with a text): the two ways a BidirLM-Omni embeds them.

`"sum"` (the default) is the protocol of the released mteb wrapper behind the paper's MIEB and MAEB scores:
each part of an item (its text, its image, its clip) is embedded alone and the item's embedding is the sum
of its parts' embeddings; the instruction goes on the text parts only, never on media. `"joint"` renders
the item as one sequence in the chat template (clip, image, then text: `data.media.items`), the
instruction before its text, as the current mteb wrapper's single-message input does (that wrapper puts
the instruction in a system message instead). Items of one part are embedded the same way by both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bidirlm_jax.errors import ConfigError

PROTOCOLS = ("sum", "joint")
MEDIA = ("image", "audio")
_TOWERS = {"image": "a vision tower (Qwen3-VL, BidirLM-Omni)", "audio": "an audio tower (Qwen3-ASR, BidirLM-Omni)"}


def modalities(model: Any) -> list[str]:
    """The inputs a loaded model takes: text, and image / audio when it holds that tower."""
    config = model.config
    return ["text", *(m for m, tower in zip(MEDIA, ("vision", "audio")) if getattr(config, tower, None) is not None)]


def require_modalities(model: Any, needed: Any, what: str) -> None:
    """Refuse inputs (`what`, holding the modalities `needed`) that the model cannot read, before anything runs."""
    has = modalities(model)
    missing = sorted(set(needed) - set(has))
    if missing:
        towers = " and ".join(_TOWERS.get(m, f"a tower for {m} (BidirLM has none)") for m in missing)
        raise ConfigError(
            f"{what} has {', '.join(missing)} inputs, and the model reads {', '.join(has)} only; evaluate a "
            f"checkpoint with {towers}"
        )


def item_modalities(item: str | Mapping[str, Any]) -> set[str]:
    """The modalities of one item (a string is text)."""
    if isinstance(item, str):
        return {"text"}
    return {k for k in ("text", *MEDIA) if item.get(k) is not None}


def encode_items(
    model: Any,
    tokenizer: Any,
    items: Sequence[str | Mapping[str, Any]],
    *,
    protocol: str = "sum",
    instruction: str | None = None,
    **settings: Any,
) -> np.ndarray:
    """`[len(items), d]` embeddings of texts and `{"text", "image", "audio"}` items under `protocol`;
    `settings` go to `embed.encode.encode` (pooling, normalize, batch_size, max_length, progress)."""
    from bidirlm_jax.embed.encode import encode, query_prompt  # jax: not imported by the CLI's argument parser

    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    items = list(items)
    if protocol == "joint" or all(isinstance(i, str) or len(item_modalities(i)) == 1 for i in items):
        if instruction is not None:  # texts are instructed by `encode`; the text beside media here
            prefix = query_prompt(instruction)
            items = [
                i if isinstance(i, str) or i.get("text") is None else {**i, "text": prefix + i["text"]} for i in items
            ]
        return encode(model, tokenizer, items, instruction=instruction, **settings)
    parts: dict[str, tuple[list[int], list[Any]]] = {m: ([], []) for m in ("text", *MEDIA)}
    for index, item in enumerate(items):
        for modality in sorted(item_modalities(item)):
            part = (
                item if isinstance(item, str) else item[modality] if modality == "text" else {modality: item[modality]}
            )
            parts[modality][0].append(index)
            parts[modality][1].append(part)
    out = None
    for modality, (index, values) in parts.items():
        if values:
            embeddings = encode(
                model, tokenizer, values, instruction=instruction if modality == "text" else None, **settings
            )
            out = np.zeros((len(items), embeddings.shape[1]), np.float32) if out is None else out
            out[index] += embeddings  # each item once per modality
    return out
