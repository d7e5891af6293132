"""Where the text backbone lives inside a Hugging Face checkpoint's key space.

A causal LM keeps it under `model.`; Qwen3-VL and transformers-5 Gemma3 multimodal checkpoints under
`model.language_model.`; older Gemma3 multimodal checkpoints under `language_model.model.`; a bare
`AutoModel` export (sentence-transformers) has no prefix at all. Converters and merges name tensors
relative to the backbone ("layers.3.mlp.up_proj.weight") so that one key table serves every layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bidirlm_jax.errors import CheckpointError

LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Layout:
    """Key prefixes of one checkpoint layout: the backbone's and the LM head's."""

    backbone: str
    head: str

    def to_canonical(self, key: str) -> str | None:
        """Backbone-relative name ("layers.0...", "embed_tokens.weight", "lm_head.weight"), or None."""
        if key == self.head + LM_HEAD:
            return LM_HEAD
        if key.startswith(self.backbone):
            return key[len(self.backbone) :]
        return None

    def to_checkpoint(self, canonical: str) -> str:
        return self.head + LM_HEAD if canonical == LM_HEAD else self.backbone + canonical


CAUSAL_LM = Layout("model.", "")
LAYOUTS = (
    Layout("model.language_model.", ""),  # Qwen3-VL, Gemma3 multimodal (transformers >= 4.52)
    Layout("language_model.model.", "language_model."),  # Gemma3 multimodal as first published
    CAUSAL_LM,
    Layout("", ""),  # bare backbone (AutoModel / sentence-transformers export)
)


def detect_layout(keys: Iterable[str]) -> Layout:
    """The layout whose backbone holds `embed_tokens.weight`, most specific prefix first."""
    keys = set(keys)
    for layout in LAYOUTS:
        if layout.backbone + "embed_tokens.weight" in keys:
            return layout
    raise CheckpointError(
        "cannot find a text backbone in this checkpoint: no `embed_tokens.weight` under any known prefix "
        f"({', '.join(repr(layout.backbone) for layout in LAYOUTS)}); pass an explicit key mapping"
    )
