"""Items → the token ids and media of one model row: the prompt a media encoder reads.

An item is a text (`str`) or a mapping with any of `"image"` (a PIL image, a path, encoded bytes, or a
parquet image cell `{"bytes", "path"}`), `"audio"` (a path or `{"array", "sampling_rate"}`) and `"text"`.
`template="chat"` (the default, as the released BidirLM-Omni's sentence-transformers pipeline renders every
input, text-only ones included; no system prompt) renders

    <|im_start|>user\\n [<|audio_start|><|audio_pad|>×n<|audio_end|>] [<|vision_start|><|image_pad|>×n<|vision_end|>] text <|im_end|>\\n

the clip before the image before the text, as the release orders them; `template="plain"` drops the chat
wrapper and keeps the tokenizer's own special tokens around the text. Placeholder runs are expanded here
(t·h·w/merge² per image, the tower's per-chunk count per clip), so the ids are what transformers' processor
returns for the same prompt. Only the text is ever truncated: a row whose media alone exceed `max_length`
is refused (lower the pixel budget or the clip length, or raise max_length).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bidirlm_jax.data.media.audio import FORMULAS, HOP, MAX_SECONDS, SAMPLING_RATE, audio_features, placeholder_count
from bidirlm_jax.data.media.images import ImageSettings, process_image, read_preprocessor_config
from bidirlm_jax.errors import ConfigError

TEMPLATES = ("chat", "plain")
ITEM_KEYS = ("text", "image", "audio")
_CHAT = ("<|im_start|>user\n", "<|im_end|>\n")


@dataclass
class RenderedItem:
    """One row's ids (placeholders expanded) and media, with what was cut or resized on the way."""

    ids: list[int]
    patches: np.ndarray | None = None  # [t·h·w, patch_dim] float32, merge-block order
    grid: tuple[int, int, int] | None = None
    features: np.ndarray | None = None  # [mel_bins, frames] float32
    text_truncated: bool = False
    downscaled: bool = False
    audio_truncated: int = 0  # samples cut beyond the maximum duration
    audio_dropped: int = 0  # tower tokens beyond the release's whole-clip count (`audio_placeholders="release"`)


@dataclass
class VisionTokens:
    """What the host needs of a model's vision side."""

    image: int
    start: int
    end: int
    merge_size: int
    grid_side: int
    settings: ImageSettings

    @property
    def max_patches(self) -> int:
        """Patches of the largest image the pixel budget lets through, in whole merged tokens."""
        unit = self.merge_size**2
        return -(-(self.settings.max_pixels // self.settings.patch_size**2) // unit) * unit


@dataclass
class AudioTokens:
    """What the host needs of a model's audio side."""

    audio: int
    start: int
    end: int
    n_window: int
    mel_bins: int
    max_seconds: float = MAX_SECONDS
    placeholders: str = "chunks"  # "chunks": every token the tower makes; "release": BidirLM-Omni's processor

    @property
    def max_frames(self) -> int:
        """Mel frames of the longest clip the maximum duration lets through, in whole chunks."""
        chunk = 2 * self.n_window
        return -(-int(self.max_seconds * SAMPLING_RATE) // HOP // chunk) * chunk


@dataclass
class MediaProcessor:
    """Renders items for one model: its tokenizer, special ids and tower settings (`media_processor` builds
    it from a loaded model)."""

    tokenizer: Any
    vision: VisionTokens | None = None
    audio: AudioTokens | None = None
    template: str = "chat"
    _chat: tuple[list[int], list[int]] = field(init=False, repr=False)

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ConfigError(f"template {self.template!r} is not one of {TEMPLATES}")
        if self.template == "chat":
            self._chat = tuple(self._special_run(text) for text in _CHAT)

    def _special_run(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        token = text[: text.index("|>") + 2]
        if self.tokenizer.convert_tokens_to_ids(token) not in ids:
            raise ConfigError(
                f"the tokenizer has no {token} token, which the chat template needs; use the checkpoint's own "
                "tokenizer, or template='plain'"
            )
        return ids

    def render(self, item: str | Mapping[str, Any], max_length: int, *, where: str = "item") -> RenderedItem:
        """`item` as one row of at most `max_length` ids; `where` names it in errors."""
        text, image, audio = _parts(item, where)
        out = RenderedItem(ids=[])
        media: list[int] = []
        if audio is not None:
            media += self._audio(audio, out, where)
        if image is not None:
            media += self._image(image, out, where)
        head, tail = self._chat if self.template == "chat" else ([], [])
        fixed = len(head) + len(media) + len(tail)
        if fixed > max_length:
            raise ConfigError(
                f"{where}: its template and media take {fixed} tokens, more than max_length {max_length}; raise "
                "max_length, or lower the image pixel budget or the clip length"
            )
        text_ids = self._text_ids(text or "")
        out.text_truncated = len(text_ids) > max_length - fixed
        out.ids = [*head, *media, *text_ids[: max_length - fixed], *tail]
        return out

    def _text_ids(self, text: str) -> list[int]:
        if self.template == "chat":
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(text)["input_ids"]

    def _image(self, image: Any, out: RenderedItem, where: str) -> list[int]:
        v = self.vision
        if v is None:
            raise ConfigError(f"{where}: holds an image but the model has no vision tower; load a Qwen3-VL/Omni model")
        try:
            out.patches, out.grid, out.downscaled = process_image(image, v.settings)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        tokens = int(np.prod(out.grid)) // v.merge_size**2
        return [v.start, *[v.image] * tokens, v.end]

    def _audio(self, audio: Any, out: RenderedItem, where: str) -> list[int]:
        a = self.audio
        if a is None:
            raise ConfigError(f"{where}: holds audio but the model has no audio tower; load a Qwen3-ASR/Omni model")
        try:
            out.features, out.audio_truncated = audio_features(audio, max_seconds=a.max_seconds, mel_bins=a.mel_bins)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        tokens, out.audio_dropped = placeholder_count(out.features.shape[1], a.n_window, formula=a.placeholders)
        if tokens == 0:
            raise ConfigError(f"{where}: the clip is shorter than one mel frame (10 ms); give a longer clip")
        return [a.start, *[a.audio] * tokens, a.end]


def _parts(item: Any, where: str) -> tuple[str | None, Any, Any]:
    """(text, image, audio) of an item."""
    if isinstance(item, str):
        return item, None, None
    if not isinstance(item, Mapping):
        raise ConfigError(f'{where}: an item is a string or {{"text", "image", "audio"}}, got {type(item).__name__}')
    unknown = set(item) - set(ITEM_KEYS)
    if unknown or not any(item.get(k) is not None for k in ITEM_KEYS):
        raise ConfigError(
            f"{where}: an item's fields are {ITEM_KEYS} (at least one), got {sorted(item)}; e.g. "
            '{"image": "cat.png", "text": "a cat"}'
        )
    text = item.get("text")
    if text is not None and not isinstance(text, str):
        raise ConfigError(f'{where}: "text" must be a string, got {type(text).__name__}')
    image = item.get("image")
    if isinstance(image, Mapping):  # a parquet / datasets image cell
        image = image.get("bytes") or image.get("path")
        if image is None:
            raise ConfigError(f'{where}: an image cell needs "bytes" or "path"')
    return text, image, item.get("audio")


def media_processor(
    model: Any, tokenizer: Any, *, preprocessor: Mapping[str, Any] | None = None, **settings
) -> MediaProcessor:
    """The processor of a loaded model or its config (special ids and tower settings) and tokenizer;
    `preprocessor`: the checkpoint's `preprocessor_config.json` (image normalisation, pixel budget);
    `settings`: `template`, `max_pixels`, `min_pixels`, `max_seconds`, `audio_placeholders` ("chunks", or
    "release": BidirLM-Omni's processor's whole-clip count, each clip's first tokens kept; the model follows
    the placeholders it is given) (a `max_pixels` alone lowers the minimum
    to a quarter of it at most, so that smart_resize's upscaling of small images stays within the budget and
    fixed-shape batches hold every image)."""
    config = getattr(model, "config", model)
    template = settings.pop("template", "chat")
    max_seconds = settings.pop("max_seconds", MAX_SECONDS)
    placeholders = settings.pop("audio_placeholders", "chunks")
    if placeholders not in FORMULAS:
        raise ConfigError(f"audio_placeholders {placeholders!r} is not one of {FORMULAS}")
    vision = audio = None
    if getattr(config, "vision", None) is not None:
        vc = config.vision
        sizes = dict(
            patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size
        )
        image = ImageSettings.from_preprocessor_config(preprocessor or {}, **sizes)
        if "max_pixels" in settings:
            settings.setdefault("min_pixels", min(image.min_pixels, settings["max_pixels"] // 4))
        image = dataclasses.replace(image, **settings)
        vision = VisionTokens(
            config.image_token_id,
            config.vision_start_token_id,
            config.vision_end_token_id,
            vc.spatial_merge_size,
            vc.grid_side,
            image,
        )
    elif settings:
        raise ConfigError(f"image settings {sorted(settings)} given for a model without a vision tower")
    if getattr(config, "audio", None) is not None:
        ac = config.audio
        start, end = (_token_id(tokenizer, config, name) for name in ("audio_start", "audio_end"))
        audio = AudioTokens(config.audio_token_id, start, end, ac.n_window, ac.num_mel_bins, max_seconds, placeholders)
    return MediaProcessor(tokenizer, vision, audio, template)


def checkpoint_processor(path: Any, model: Any, tokenizer: Any) -> Any:
    """What embeds for a model loaded from the directory `path`: for a model with towers, its processor with the
    checkpoint's `preprocessor_config.json`; for a text model, `tokenizer` itself."""
    if not hasattr(model, "batch_hidden_states") or isinstance(tokenizer, MediaProcessor):
        return tokenizer
    return media_processor(model, tokenizer, preprocessor=read_preprocessor_config(path))


def _token_id(tokenizer: Any, config: Any, name: str) -> int:
    """`<|{name}|>`'s id: the config's `{name}_token_id` when it declares one, else the tokenizer's."""
    declared = getattr(config, f"{name}_token_id", None)
    if declared is None:
        extra = dict(getattr(config, "extra", ()))
        declared = extra.get(f"{name}_token_id")
    if declared is not None:
        return int(declared)
    token = f"<|{name}|>"
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or found == tokenizer.unk_token_id:
        raise ConfigError(
            f"the tokenizer has no {token} token and the config no {name}_token_id; use the checkpoint's tokenizer"
        )
    return int(found)
