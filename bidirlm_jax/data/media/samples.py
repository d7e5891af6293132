"""Image–caption pairs every install can make offline: scikit-image's sample photographs (inside its wheel,
never fetched) with captions written here, for the tiny image presets, the demo and the tests.

Each photograph gives several random crops (60–100 % of each side, deterministic in the seed): the query
is the caption, the positive a crop. A held-out set (`sample_image_pairs(seed=...)` with another seed)
holds other crops of the same photographs, so a tiny encoder trained for minutes can show that it
learned to match an unseen view of a picture to its caption.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from bidirlm_jax.errors import ConfigError

CAPTIONS = {
    "astronaut.png": "an astronaut in a white space suit in front of a flag",
    "brick.png": "a grey brick wall",
    "camera.png": "a man in a coat standing behind a camera on a tripod",
    "cell.png": "a cell seen under a microscope",
    "chelsea.png": "a tabby cat looking to the side",
    "coffee.png": "a cup of coffee on a saucer",
    "coins.png": "rows of old coins on a dark background",
    "color.png": "colourful stripes of paint",
    "grass.png": "a patch of green grass",
    "gravel.png": "a close view of gravel",
    "horse.png": "the black silhouette of a horse",
    "hubble_deep_field.jpg": "distant galaxies in the night sky",
    "ihc.png": "a stained tissue sample",
    "logo.png": "the scikit-image logo",
    "microaneurysms.png": "the blood vessels at the back of an eye",
    "moon.png": "craters on the surface of the moon",
    "motorcycle_left.png": "a motorcycle in a workshop",
    "page.png": "a scanned page of printed text",
    "retina.jpg": "a photograph of a retina",
    "rocket.jpg": "a rocket on its launch pad",
    "text.png": "handwritten and printed letters on paper",
}


def sample_image(name: str) -> Image.Image:
    """One of scikit-image's sample photographs, as RGB."""
    try:
        import skimage.data
    except ImportError as e:
        raise ConfigError("the sample images come with scikit-image: pip install scikit-image") from e
    path = os.path.join(os.path.dirname(skimage.data.__file__), name)
    with Image.open(path) as image:
        return image.convert("RGB")


def random_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop of 60–100 % of each side at a random place."""
    width, height = image.size
    w, h = (int(side * rng.uniform(0.6, 1.0)) for side in (width, height))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return image.crop((left, top, left + w, top + h))


def sample_image_pairs(crops: int = 4, *, seed: int = 0, names: list[str] | None = None) -> list[tuple[str, dict]]:
    """`(caption, {"image": crop})` for `crops` crops of each sample photograph, photograph after photograph."""
    rng = np.random.default_rng(seed)
    pairs = []
    for name in names or sorted(CAPTIONS):
        image = sample_image(name)
        pairs += [(CAPTIONS[name], {"image": random_crop(image, rng)}) for _ in range(crops)]
    return pairs
