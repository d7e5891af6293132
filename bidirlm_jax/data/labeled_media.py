"""Labeled examples for a model with towers: each example one item (`data.media.items`: its image or clip,
and its text) rendered in the checkpoint's chat template, and the rows training and evaluation read.

`encode_labeled` is where a split takes its path: a model without towers tokenises text (`data.labeled_rows`,
unchanged); a model with towers renders every example through its `MediaProcessor`, text-only ones included
(as the released BidirLM-Omni reads every input). Media given to a model without the matching tower are
refused, naming where. Items are rendered when a row is read (images decoded and resized, clips turned into
log-mel features), so a large split costs no memory up front; `MediaEncoded.num_truncated` counts the texts
cut to `max_length` among the rows rendered so far (every row, after an evaluation).

Training rows (`MediaEncoded.row`, what `data.labeled_rows.TrainRows` serves) have fixed shapes
(`data.media.collate` with `fixed=True`: `max_length` ids, the pixel budget's patches, the maximum clip's
frames, for the media kinds the training split holds), so the step compiles once. Evaluation batches
(`MediaEncoded.batch`) take a few bucketed shapes instead.

Generated splits (`generated_split`, offline presets and tests): `sample_images` — eight of scikit-image's photographs
(random crops) with a caption hypothesis, `true` when it is the photograph's own caption, `false` when another
one's (e-SNLI-VE in miniature); `spoken` — an espeak-ng question with a text passage, `yes` when the passage
answers that question, `no` when it answers another (BoolQ-Audio in miniature). Each photograph and question
comes with both labels, so the text alone cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bidirlm_jax.data.labeled import LabeledSplit, LabelMap, check_labels
from bidirlm_jax.data.labeled_rows import Encoded, encode_split
from bidirlm_jax.data.media.collate import collate
from bidirlm_jax.data.media.items import MediaProcessor, RenderedItem
from bidirlm_jax.errors import ConfigError

TOWERS = {"image": "vision", "audio": "audio"}  # media kind -> the processor's (model's) tower
GENERATED = ("sample_images", "spoken")
PHOTOGRAPHS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "horse.png",
    "moon.png",
    "page.png",
    "rocket.jpg",
)
QUESTIONS = (  # (spoken question, the passage that answers it); other passages answer other questions
    ("is the cat on the mat", "the cat sat on the mat"),
    ("is the rocket ready", "a rocket stands on the launch pad"),
    ("may I have a coffee", "please pass me a cup of coffee"),
    ("is the moon out", "the moon is bright tonight"),
    ("should we open the window", "open the window and let the cold air in"),
    ("what is she doing", "she reads a book by the fire"),
    ("where are the horses", "two horses run across the field"),
    ("which way do we go", "turn left at the next corner"),
)


@dataclass
class MediaEncoded:
    """A split as the model's items, with label ids (or regression targets); see the module doc."""

    task: str
    items: list[Any]
    labels: np.ndarray
    where: list[str]
    processor: MediaProcessor
    max_length: int
    media: tuple[str, ...]  # the media keys every training row carries ("image", "audio")
    truncated: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_truncated(self) -> int:
        return len(self.truncated)

    def render(self, i: int) -> RenderedItem:
        rendered = self.processor.render(self.items[i], self.max_length, where=self.where[i])
        if rendered.text_truncated:
            self.truncated.add(i)
        return rendered

    def row(self, i: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
        """Example `i` as one fixed-shape row (the processor pads with its tokenizer's `pad_id`) and its label."""
        del pad_id
        if seq_len != self.max_length:
            raise ConfigError(f"media rows are rendered at max_length {self.max_length}, not {seq_len}")
        arrays = collate([self.render(i)], self.processor, rows=1, max_length=seq_len, fixed=True, media=self.media)
        return {**{k: v[0] for k, v in arrays.items()}, "labels": np.asarray(self.labels[i])}

    def batch(self, indices: Sequence[int], rows: int) -> dict[str, np.ndarray]:
        """Examples `indices` as one batch of `rows` rows (a short one filled with copies), bucketed shapes."""
        return collate([self.render(int(i)) for i in indices], self.processor, rows=rows, max_length=self.max_length)


def _item(text: str, media: dict[str, Any]) -> Any:
    """An example as a processor item; a hub audio cell `{"bytes", "path"}` as its bytes or its path."""
    if not media:
        return text
    audio = media.get("audio")
    if isinstance(audio, dict) and "array" not in audio:
        media = {**media, "audio": audio.get("bytes") or audio.get("path")}
    return {**media, "text": text}


def encode_media_split(
    split: LabeledSplit, processor: MediaProcessor, label_map: LabelMap, *, max_length: int
) -> MediaEncoded:
    """A sequence task's split as items for `processor`'s model, labels mapped to ids; media the model has no
    tower for are refused here, naming where."""
    if split.task == "token_classification":
        raise ConfigError(
            "token classification labels words of a text; a model with towers fine-tunes sequence tasks "
            "(classification, regression): drop model.towers, or change the objective"
        )
    check_labels(split, label_map)
    media = split.media or [{}] * len(split)
    for kind in split.media_kinds:
        if getattr(processor, TOWERS[kind]) is None:
            first = next(w for w, m in zip(split.where, media) if kind in m)
            raise ConfigError(
                f"{first}: the {split.name} split holds {kind} but the model has no {TOWERS[kind]} tower; fine-tune "
                "a checkpoint that has one (Qwen3-VL for images, Qwen3-ASR for audio, Omni for both)"
            )
    if split.task == "regression":
        labels = np.asarray(split.labels, np.float32)
    else:
        labels = np.asarray(
            [label_map.id(v, f"{split.name} split, {w}") for v, w in zip(split.labels, split.where)], np.int32
        )
    items = [_item(t, m) for t, m in zip(split.texts, media)]
    return MediaEncoded(split.task, items, labels, list(split.where), processor, max_length, split.media_kinds)


def encode_labeled(
    split: LabeledSplit,
    tokenizer,
    label_map: LabelMap,
    *,
    max_length: int,
    word_separator: str = " ",
    processor: MediaProcessor | None = None,
) -> Encoded | MediaEncoded:
    """A split as its model reads it: rendered items for a model with towers (`processor`), else tokens."""
    if processor is not None:
        return encode_media_split(split, processor, label_map, max_length=max_length)
    if split.media:
        first = next(w for w, m in zip(split.where, split.media) if m)
        raise ConfigError(
            f"{first}: the {split.name} split holds {' and '.join(split.media_kinds)}, but the run trains a text "
            "model; fine-tune a Qwen3-VL / Qwen3-ASR / Omni checkpoint (or a tiny-qwen3-vl / -asr preset) with "
            "--config.model.towers=true"
        )
    return encode_split(split, tokenizer, label_map, max_length=max_length, word_separator=word_separator)


# --- generated splits -----------------------------------------------------------------------------


def generated_split(source: str, task: str, size: int, *, seed: int, name: str) -> LabeledSplit:
    """`size` examples of a generated media task (see the module doc); classification only."""
    if source not in GENERATED:
        raise ConfigError(f"no generated media task {source!r}; choose one of {GENERATED}")
    if task != "classification":
        raise ConfigError(f"data.source={source} generates a classification task, not {task}")
    if size < 2:
        raise ConfigError(f"a generated split needs at least 2 examples, got {size}")
    make = _photographs if source == "sample_images" else _questions
    texts, media, labels = make(size, np.random.default_rng(seed))
    where = [f"{source} {name} example {i}" for i in range(size)]
    return LabeledSplit(name, source, task, texts=texts, labels=labels, where=where, media=media)


def _photographs(size: int, rng: np.random.Generator):
    from bidirlm_jax.data.media.samples import CAPTIONS, random_crop, sample_image

    names = PHOTOGRAPHS
    photos = {n: sample_image(n) for n in names[: min(size, len(names))]}
    texts, media, labels = [], [], []
    for k in range(size):
        photo, own = names[k % len(names)], (k // len(names)) % 2 == 0  # each photograph with both labels
        other = names[(k + 1 + int(rng.integers(len(names) - 1))) % len(names)]
        texts.append(CAPTIONS[photo if own else other])
        media.append({"image": random_crop(photos[photo], rng)})
        labels.append("true" if own else "false")
    return texts, media, labels


def _questions(size: int, rng: np.random.Generator):
    from bidirlm_jax.data.media.speech import speak

    texts, media, labels = [], [], []
    for k in range(size):
        q, own = k % len(QUESTIONS), (k // len(QUESTIONS)) % 2 == 0  # each question with both labels
        other = (q + 1 + int(rng.integers(len(QUESTIONS) - 1))) % len(QUESTIONS)
        clip = speak(QUESTIONS[q][0], speed=int(rng.integers(150, 171)), pitch=int(rng.integers(40, 61)))
        texts.append(QUESTIONS[q if own else other][1])
        media.append({"audio": clip})
        labels.append("yes" if own else "no")
    return texts, media, labels
