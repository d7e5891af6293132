"""Images → the Qwen3-VL vision tower's inputs, on the host: what transformers' Qwen2-VL image processor
(PIL backend, Qwen3-VL's `preprocessor_config.json` settings) returns, `pixel_values [N, 3·2·16·16]` and
`image_grid_thw [n, 3]`.

Each image is decoded with PIL and made RGB (transparency composited onto white), resized with bicubic
resampling to `smart_resize`'s size (both sides multiples of patch × merge, the pixel count within the
budget, the aspect ratio kept as closely as that allows), scaled to [0, 1] (through float64, as
transformers does), normalised with the mean and std, and cut into patches in merge-block order (each
2 × 2 block of patches contiguous, blocks row-major; the still frame repeated over the temporal patch),
so that every 4 consecutive rows are one merged token of the tower.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from bidirlm_jax.errors import ConfigError

MAX_ASPECT_RATIO = 200  # transformers refuses longer sides past 200 × the shorter one


@dataclass(frozen=True)
class ImageSettings:
    """The image processor's settings; defaults are Qwen3-VL's `preprocessor_config.json` (256² to 4096² pixels).
    `max_pixels` is the budget: larger images are scaled down to it (cap it for training, e.g. 256·32·32)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(
                f"image pixel budget must satisfy 0 < min_pixels ≤ max_pixels, got {self.min_pixels}, {self.max_pixels}"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("image_mean and image_std need one value per RGB channel")

    @property
    def patch_dim(self) -> int:
        """Length of one patch row: RGB × temporal patch × patch × patch."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @property
    def factor(self) -> int:
        """Both resized sides are multiples of this (32 for Qwen3-VL)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(cls, d: Mapping[str, Any], **overrides: Any) -> ImageSettings:
        """From a checkpoint's `preprocessor_config.json` (`size.shortest_edge/longest_edge` or the legacy
        `min_pixels/max_pixels`); `overrides` win (e.g. a training pixel budget)."""
        kw: dict[str, Any] = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        size = d.get("size") or {}
        kw.setdefault("min_pixels", size.get("shortest_edge", cls.min_pixels))
        kw.setdefault("max_pixels", size.get("longest_edge", cls.max_pixels))
        for name in ("image_mean", "image_std"):
            if name in kw:
                kw[name] = tuple(float(v) for v in kw[name])
        return cls(**{**kw, **overrides})

    def to_preprocessor_config(self) -> dict[str, Any]:
        """The `preprocessor_config.json` transformers' Qwen2-VL image processor reads as these settings."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
        }


@dataclass
class ProcessedImages:
    pixel_values: np.ndarray  # [Σ t·h·w, 3·T·p·p] float32
    image_grid_thw: np.ndarray  # [n, 3] int64
    downscaled: int  # images over the pixel budget, scaled down to it


def read_preprocessor_config(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's `preprocessor_config.json` (image normalisation and pixel budget), {} without one."""
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise ConfigError(f"{file} is not valid JSON ({e}); restore it from the checkpoint") from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` (Python's round: half to even), then scaled (down
    with floor, or up with ceil) so that the pixel count lies within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ConfigError(f"image of {width}×{height} pixels: the aspect ratio must stay below {MAX_ASPECT_RATIO}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
    return h, w


def load_image(source: Image.Image | str | os.PathLike | bytes) -> Image.Image:
    """A PIL image from a path or encoded bytes (or one given), decoded now so a bad file fails here."""
    if isinstance(source, Image.Image):
        return source
    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
        image.load()
    except FileNotFoundError as e:
        raise ConfigError(f"image file not found: {name}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"cannot decode {name} as an image ({e}); give a PNG, JPEG or other file PIL reads") from e
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, transparent pixels composited onto white (what the processor's `do_convert_rgb` does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def patchify(image: np.ndarray, settings: ImageSettings) -> np.ndarray:
    """[C, H, W] → [H/p · W/p, C·T·p·p] rows in merge-block order, the frame repeated over T."""
    p, m, t = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    c, h, w = image.shape
    gh, gw = h // p, w // p
    blocks = image.reshape(c, gh // m, m, p, gw // m, m, p)
    # (block row, block col, row in block, col in block, channel, pixel row, pixel col)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
    return np.ascontiguousarray(frames).reshape(gh * gw, c * t * p * p)


def process_image(source, settings: ImageSettings) -> tuple[np.ndarray, tuple[int, int, int], bool]:
    """One image → (patch rows, grid (1, h/p, w/p), whether it was scaled down to the budget)."""
    image = to_rgb(load_image(source))
    width, height = image.size
    h, w = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
    f = settings.factor
    downscaled = round(height / f) * f * (round(width / f) * f) > settings.max_pixels  # smart_resize's shrink branch
    resized = np.asarray(image.resize((w, h), resample=Image.Resampling.BICUBIC), np.uint8).transpose(2, 0, 1)
    scaled = (resized.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    mean = np.asarray(settings.image_mean, np.float32)[:, None, None]
    std = np.asarray(settings.image_std, np.float32)[:, None, None]
    return (
        patchify((scaled - mean) / std, settings),
        (1, h // settings.patch_size, w // settings.patch_size),
        downscaled,
    )


def process_images(sources: Iterable, settings: ImageSettings | None = None) -> ProcessedImages:
    """Images (PIL images, paths or bytes) → the tower's `pixel_values` and `image_grid_thw`, in order."""
    settings = settings or ImageSettings()
    rows, grids, downscaled = [], [], 0
    for source in sources:
        patches, grid, down = process_image(source, settings)
        rows.append(patches)
        grids.append(grid)
        downscaled += down
    if not rows:
        raise ConfigError("no images to process")
    return ProcessedImages(np.concatenate(rows), np.asarray(grids, np.int64), downscaled)
