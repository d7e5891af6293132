"""Small generated fine-tuning tasks for offline presets and tests: whether a text mentions a fruit, the share of
positive words in a text, person and place names in a sentence.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from bidirlm_jax.data.labeled import LabeledSplit
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.heads import TASKS

_FILLER = (
    "the",
    "a",
    "one",
    "this",
    "that",
    "some",
    "every",
    "dog",
    "cat",
    "bird",
    "horse",
    "man",
    "woman",
    "child",
    "teacher",
    "farmer",
    "runs",
    "sits",
    "walks",
    "sees",
    "finds",
    "likes",
    "holds",
    "near",
    "under",
    "over",
    "with",
    "from",
    "into",
    "big",
    "small",
    "red",
    "green",
    "old",
    "young",
    "quickly",
    "slowly",
    "today",
    "there",
    "here",
)
_FRUITS = ("apple", "banana", "cherry", "mango")
_POSITIVE = ("good", "great", "happy", "lovely", "bright", "kind")
_NEGATIVE = ("bad", "awful", "sad", "gloomy", "cruel", "dull")
_FIRST_NAMES = ("alice", "bruno", "chloe", "daniel", "emma", "farid")
_LAST_NAMES = ("smith", "garcia", "martin", "novak")
_PLACES = ("paris", "lima", "oslo", "cairo", "tokyo", "quebec")


def _synthetic_example(task: str, rng: np.random.Generator) -> tuple[Any, Any]:
    length = int(rng.integers(5, 12))
    words = [str(w) for w in rng.choice(_FILLER, length)]
    if task == "classification":  # does the text mention a fruit?
        label = bool(rng.integers(2))
        if label:
            words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(_FRUITS)))
        return " ".join(words), "fruit" if label else "none"
    if task == "regression":  # share of positive among the sentiment words
        k = int(rng.integers(1, 5))
        positive = int(rng.integers(k + 1))
        for j in range(k):
            pool = _POSITIVE if j < positive else _NEGATIVE
            words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(pool)))
        return " ".join(words), positive / k
    tags = ["O"] * len(words)  # person (1-2 words) and place names
    for _ in range(int(rng.integers(1, 3))):
        at = int(rng.integers(len(words) + 1))
        if rng.integers(2):
            name = [str(rng.choice(_FIRST_NAMES))] + ([str(rng.choice(_LAST_NAMES))] if rng.integers(2) else [])
            kind = "PER"
        else:
            name, kind = [str(rng.choice(_PLACES))], "LOC"
        words[at:at] = name
        tags[at:at] = [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
    return words, tags


def synthetic_split(task: str, size: int, *, seed: int, name: str = "train") -> LabeledSplit:
    """`size` generated examples of `task` (see the module doc), a pure function of `(task, size, seed)`."""
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {TASKS}")
    if size <= 0:
        raise ConfigError(f"the synthetic {name} split needs a positive size, got {size}")
    rng = np.random.default_rng((seed, TASKS.index(task), zlib.crc32(name.encode())))
    out = LabeledSplit(name=name, source="synthetic", task=task)
    for i in range(size):
        x, y = _synthetic_example(task, rng)
        if task == "token_classification":
            out.tokens.append(x)
        else:
            out.texts.append(x)
        out.labels.append(y)
        out.where.append(f"synthetic example {i}")
    return out


def synthetic_texts(split: LabeledSplit) -> list[str]:
    """The split's text, for training a tokenizer on it."""
    return [" ".join(t) for t in split.tokens] if split.task == "token_classification" else list(split.texts)
