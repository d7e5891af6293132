"""The Omni composition's settings: which input gives each tower and the tokenizer, and every choice the
paper leaves open (BidirLM-Omni, §6.3 / App. E, merges three text backbones 1/3 each and carries the two
towers, without saying the output's rope θ, its M-RoPE sections, the DeepStack taps, or what becomes of
the special tokens' embedding rows, which only their own specialist ever trained).

A value left `None` is resolved from the inputs when the merge is planned (`merge.compose`) and the
resolved settings are recorded with the output (`mergekit_config.yml`, `bidirlm.compose`), so a
composition says exactly what it did. In YAML this is the `compose:` mapping of the `bidirlm:` section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bidirlm_jax.errors import ConfigError

SPECIAL_ROWS = ("average", "specialist")
# The released model's audio delimiters (Qwen3-ASR's tokenizer), which Qwen3-ASR's -hf config does not name.
AUDIO_START_TOKEN_ID, AUDIO_END_TOKEN_ID = 151669, 151670
_INTS = ("audio_start_token_id", "audio_end_token_id")


@dataclass(frozen=True)
class OmniRecipe:
    """How three (or more) inputs compose into one BidirLM-Omni checkpoint.

    `vision` / `audio`: the input whose tower is carried bit for bit (default: the one input holding such a
    tower; two without saying which is an error); `tokenizer`: the input whose tokenizer, chat template and
    other files travel (default: the audio input's, the ASR-extended tokenizer); `rope_theta` and
    `mrope_section`: the output text model's (default: the vision input's, θ 5e6 [24, 20, 20] for
    Qwen3-VL-2B); `deepstack_visual_indexes`: the vision tower's taps (default: the vision input's; as many
    as it has mergers); `special_token_rows`: "average" merges every embedding row alike (the paper's plain
    1/3), "specialist" takes the vision tokens' rows from the vision input and the audio tokens' rows from
    the audio input; `audio_start_token_id` / `audio_end_token_id`: the audio delimiters (default: the
    release's 151669 / 151670).
    """

    vision: str | None = None
    audio: str | None = None
    tokenizer: str | None = None
    rope_theta: float | None = None
    mrope_section: tuple[int, ...] | None = None
    deepstack_visual_indexes: tuple[int, ...] | None = None
    special_token_rows: str = "average"
    audio_start_token_id: int | None = None
    audio_end_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.special_token_rows not in SPECIAL_ROWS:
            raise ConfigError(
                f"special_token_rows must be one of {', '.join(SPECIAL_ROWS)}, got {self.special_token_rows!r}"
            )
        if self.rope_theta is not None:
            object.__setattr__(self, "rope_theta", _number(self.rope_theta, "rope_theta"))
            if self.rope_theta <= 0:
                raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        for name in ("mrope_section", "deepstack_visual_indexes"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _ints(value, name))
        for name in _INTS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be a token id (a non-negative integer), got {value!r}")

    def replace(self, **changes: Any) -> OmniRecipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as the YAML writes them (tuples as lists, unset ones left out)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def recipe_from_dict(d: Any, where: str) -> OmniRecipe:
    """An `OmniRecipe` from the YAML's `bidirlm: compose:` mapping (`true` or `{}`: every default)."""
    if d is True or d is None:
        return OmniRecipe()
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a mapping of composition settings (or true), got {d!r}")
    known = {f.name for f in dataclasses.fields(OmniRecipe)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unsupported key(s) {', '.join(unknown)} (supported: {', '.join(sorted(known))})")
    return OmniRecipe(**d)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def _ints(value: Any, name: str) -> tuple[int, ...]:
    """A list of non-negative integers, from a list or a comma-separated string (the CLI's form)."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        out = tuple(int(str(v).strip()) for v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a list of integers, got {value!r}") from None
    if not out or min(out) < 0:
        raise ConfigError(f"{name} must be a non-empty list of non-negative integers, got {value!r}")
    return out
