"""The host image path against transformers 5.24's `Qwen2VLImageProcessorPil` with Qwen3-VL's settings, on
matplotlib's sample images (a JPEG photo, RGBA PNGs) and variants of them (odd sizes, grayscale, a palette
with transparency, over the pixel budget). Both run the same PIL resize and the same fp32 operations, so
`pixel_values` and `image_grid_thw` must be equal exactly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from bidirlm_jax.data.media.images import ImageSettings, process_images, smart_resize
from bidirlm_jax.errors import ConfigError

QWEN3_VL = dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def sample(name: str) -> Image.Image:
    return Image.open(cbook.get_sample_data(name, asfileobj=False))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, object]:
    """Real images in every mode the path must handle; paths and encoded bytes besides PIL images."""
    photo, logo = sample("grace_hopper.jpg"), sample("logo2.png")
    where = tmp_path_factory.mktemp("images")
    gray = photo.convert("L").crop((13, 7, 13 + 301, 7 + 203))  # odd size, grayscale
    gray.save(where / "gray.png")
    palette = sample("Minduka_Present_Blue_Pack.png").convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0  # palette entry 0 transparent: composited onto white
    return {
        "photo": photo,  # 512×600 RGB JPEG
        "logo_rgba": logo,  # 542×130 RGBA
        "tiny_odd": photo.crop((100, 100, 197, 161)),  # 97×61: upscaled to the minimum budget
        "gray_path": where / "gray.png",
        "rgba_bytes": Path(cbook.get_sample_data("Minduka_Present_Blue_Pack.png", asfileobj=False)).read_bytes(),
        "palette": palette,
    }


def _opened(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _theirs(sources, **settings):
    processor = Qwen2VLImageProcessorPil(**QWEN3_VL, **settings)
    return processor(images=[_opened(s) for s in sources], return_tensors="np")


@pytest.mark.parametrize("max_pixels", [16777216, 160 * 160], ids=["qwen3-vl budget", "small budget"])
def test_equals_transformers_pil_processor(images, max_pixels):
    sources = list(images.values())
    theirs = _theirs(sources, size={"shortest_edge": 65536 if max_pixels > 65536 else 32 * 32,
                                    "longest_edge": max_pixels})  # fmt: skip
    settings = ImageSettings(min_pixels=65536 if max_pixels > 65536 else 32 * 32, max_pixels=max_pixels)
    ours = process_images(sources, settings)
    np.testing.assert_array_equal(ours.image_grid_thw, theirs["image_grid_thw"])
    assert ours.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(ours.pixel_values, theirs["pixel_values"])
    # Over 160² pixels: the photo, the logo and the 301×203 crop; not the 128² icons nor the 97×61 crop.
    assert ours.downscaled == (0 if max_pixels > 65536 else 3)


def test_grids_of_the_notes():
    """300×400 → 288×384 (grid 18×24, 108 tokens); 97×61 is upscaled to 352×224 (grid 22×14)."""
    assert smart_resize(300, 400, 32, 65536, 16777216) == (288, 384)
    assert smart_resize(61, 97, 32, 65536, 16777216) == (224, 352)


def test_settings_from_preprocessor_config():
    config = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16, "merge_size": 2,
              "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # fmt: skip
    assert ImageSettings.from_preprocessor_config(config) == ImageSettings()
    assert ImageSettings.from_preprocessor_config(config, max_pixels=256 * 32 * 32).max_pixels == 262144


def test_bad_images_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*missing.png"):
        process_images([tmp_path / "missing.png"])
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="cannot decode .*junk.png"):
        process_images([tmp_path / "junk.png"])
    with pytest.raises(ConfigError, match="aspect ratio"):
        process_images([Image.new("RGB", (2010, 10))])
    with pytest.raises(ConfigError, match="budget"):
        ImageSettings(min_pixels=1024, max_pixels=512)
