"""Where each component of a Hugging Face checkpoint lives in its key space: one prefix per component.

A checkpoint holds components — the text backbone, the LM head, later a vision tower (`visual.`) or an
audio tower (`audio_tower.`) — each under a prefix that depends on the class that saved it: a causal LM
keeps its backbone under `model.`; Qwen3-VL and transformers-5 Gemma3 multimodal checkpoints under
`model.language_model.`; older Gemma3 multimodal ones under `language_model.model.`; the original
Qwen3-ASR under `thinker.model.`; BidirLM-Omni under `language_model.`; a bare `AutoModel` export
(sentence-transformers) has no prefix at all. A `Component` lists its known prefixes and a key that
every checkpoint of it holds; `detect_layout` finds each component's prefix, and weight tables name
tensors relative to it ("layers.3.mlp.up_proj.weight"), so one table serves every layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bidirlm_jax.errors import CheckpointError

LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Component:
    """One part of a checkpoint with a prefix of its own.

    `prefixes`: where checkpoints put it, most specific first; `anchor`: a component-relative key every
    checkpoint of it holds, which finds the prefix; `only`: when set, the component is just these keys
    (the LM head shares its prefix with everything else of a causal LM)."""

    name: str
    prefixes: tuple[str, ...]
    anchor: str
    only: tuple[str, ...] = ()

    def detect(self, keys: set[str]) -> str | None:
        """The first of `prefixes` under which `keys` hold the anchor (None: the checkpoint lacks it)."""
        return next((p for p in self.prefixes if p + self.anchor in keys), None)

    def relative(self, prefix: str, key: str) -> str | None:
        """`key` relative to this component at `prefix`, or None when it is not one of its keys."""
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix) :]
        return rest if not self.only or rest in self.only else None


TEXT = Component(
    "text",
    (
        "model.language_model.",  # Qwen3-VL, Qwen3-ASR-hf, Gemma3 multimodal (transformers >= 4.52)
        "language_model.model.",  # Gemma3 multimodal as first published
        "thinker.model.",  # Qwen3-ASR (original qwen_asr layout)
        "language_model.",  # BidirLM-Omni
        "model.",  # causal LM
        "",  # bare backbone (AutoModel / sentence-transformers export)
    ),
    "embed_tokens.weight",
)
HEAD = Component("lm_head", ("language_model.", "thinker.", ""), LM_HEAD, only=(LM_HEAD,))
# The AuT audio tower (Qwen3-ASR -hf, original Qwen3-ASR, BidirLM-Omni); -hf keeps its projector outside.
AUDIO = Component("audio_tower", ("model.audio_tower.", "thinker.audio_tower.", "audio_tower."), "conv2d1.weight")
AUDIO_PROJECTOR = Component(
    "audio_projector", ("model.multi_modal_projector.", "multi_modal_projector."), "linear_1.weight"
)
VISION = Component("visual", ("model.visual.", "visual."), "patch_embed.proj.weight")  # Qwen3-VL's tower


@dataclass(frozen=True)
class Layout:
    """Each detected component's prefix in one checkpoint, as (component, prefix) pairs."""

    prefixes: tuple[tuple[Component, str], ...]

    def prefix(self, component: Component) -> str | None:
        return next((p for c, p in self.prefixes if c == component), None)

    def locate(self, key: str) -> tuple[Component, str] | None:
        """(component, relative key) of `key`: the component with the longest matching prefix, or None."""
        found = [(len(p), bool(c.only), c, rel) for c, p in self.prefixes if (rel := c.relative(p, key)) is not None]
        if not found:
            return None
        _, _, component, rel = max(found, key=lambda f: f[:2])  # on a tie the `only` component (the head)
        return component, rel

    def key(self, component: Component, relative: str) -> str:
        """The checkpoint key of a component-relative name."""
        prefix = self.prefix(component)
        if prefix is None:
            raise CheckpointError(f"this checkpoint layout has no {component.name} component")
        return prefix + relative

    def to_canonical(self, key: str) -> str | None:
        """Backbone-relative name of a text-model key ("layers.0...", "embed_tokens.weight", "lm_head.weight"),
        or None outside the text backbone and its head (towers, buffers of other modules)."""
        where = self.locate(key)
        return where[1] if where is not None and where[0] in (TEXT, HEAD) else None

    def to_checkpoint(self, canonical: str) -> str:
        return self.key(HEAD if canonical == LM_HEAD else TEXT, canonical)


CAUSAL_LM = Layout(((TEXT, "model."), (HEAD, "")))
QWEN3_ASR_HF = Layout(
    (
        (TEXT, "model.language_model."),
        (HEAD, ""),
        (AUDIO, "model.audio_tower."),
        (AUDIO_PROJECTOR, "model.multi_modal_projector."),
    )
)  # transformers' Qwen3ASRForConditionalGeneration
QWEN3_VL = Layout(((TEXT, "model.language_model."), (HEAD, ""), (VISION, "model.visual.")))  # ForConditionalGeneration
# BidirLM-Omni's released `BidirLMOmniModel` (tied: no LM head tensor is written)
BIDIRLM_OMNI = Layout(((TEXT, "language_model."), (HEAD, ""), (VISION, "visual."), (AUDIO, "audio_tower.")))


def detect_layout(keys: Iterable[str], components: Sequence[Component] = (TEXT, HEAD)) -> Layout:
    """Each component's prefix in a checkpoint holding `keys`; the text backbone must be there, the others
    may be absent (a tied LM head, a text-only checkpoint read for its towers)."""
    keys = set(keys)
    found = tuple((c, p) for c in components if (p := c.detect(keys)) is not None)
    if TEXT in components and all(c != TEXT for c, _ in found):
        raise CheckpointError(
            "cannot find a text backbone in this checkpoint: no `embed_tokens.weight` under any known prefix "
            f"({', '.join(repr(p) for p in TEXT.prefixes)}); pass an explicit key mapping"
        )
    return Layout(found)
