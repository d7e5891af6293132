"""mteb's batches of images and clips as our items: the adapter owns the collation.

mteb hands an encoder a DataLoader of rows whose `"image"` is a PIL image and whose `"audio"` is whatever
the dataset holds: a `datasets.Audio` cell (decoded by torchcodec, which we do not install), a raw
`{"array", "sampling_rate"}` (MAEB's raw columns), or `{"bytes", "path"}`. Its own `AudioCollator` resamples
with torchaudio. Here audio columns are read undecoded and decoded with soundfile, made mono and resampled to
16 kHz with soxr (`data.media.audio.load_audio`, as training and `bidirlm embed` do), cut to the maximum
duration; images become RGB as the image processor makes them (`data.media.images.to_rgb`). The resampler
differs from mteb's torchaudio (scores on clips not at 16 kHz may differ from a torch model's in the last
digits); everything else is what our own data path reads, so local files score the same through mteb as
through `bidirlm eval`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from bidirlm_jax.data.media.audio import MAX_SECONDS, SAMPLING_RATE, load_audio
from bidirlm_jax.data.media.images import load_image, to_rgb
from bidirlm_jax.errors import ConfigError


class MediaCollator:
    """Rows -> a batch `{column: [values]}` with images as RGB PIL images and clips as 16 kHz mono
    `{"array", "sampling_rate"}` of at most `max_seconds`; `None` cells (an absent modality) stay `None`."""

    def __init__(self, *, max_seconds: float = MAX_SECONDS):
        self.max_seconds = max_seconds

    def __call__(self, rows: list[Mapping[str, Any]]) -> dict[str, list[Any]]:
        batch: dict[str, list[Any]] = {key: [] for key in rows[0]}
        for row in rows:
            for key, value in row.items():
                if value is not None and key == "image":
                    value = to_rgb(image_of(value))
                elif value is not None and key == "audio":
                    value = {"array": self.clip(value), "sampling_rate": SAMPLING_RATE}
                batch[key].append(value)
        return batch

    def clip(self, audio: Any) -> np.ndarray:
        """One clip's samples: mono, 16 kHz, at most `max_seconds`."""
        return load_audio(audio_array(audio), max_seconds=self.max_seconds).samples


def image_of(value: Any) -> Image.Image:
    """A PIL image from a PIL image, a path, encoded bytes, a `{"bytes", "path"}` cell or an `[H, W(, C)]` array."""
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise ConfigError('an image cell needs "bytes" or "path"')
    return load_image(value)


def audio_array(value: Any) -> dict[str, Any]:
    """`{"array": [samples] or [samples, channels], "sampling_rate"}` of a clip given as such, as
    `{"bytes", "path"}` (soundfile decodes it) or as a path. A 2-D array with fewer rows than columns is
    channels-first (torch's layout) and is transposed."""
    import soundfile

    if isinstance(value, (str, os.PathLike)):
        value = {"path": os.fspath(value)}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f'audio must be {{"array", "sampling_rate"}}, {{"bytes", "path"}} or a path, not {type(value).__name__}'
        )
    if "array" in value:
        array = np.asarray(value["array"])
        if array.ndim == 2 and array.shape[0] < array.shape[1]:
            array = array.T
        return {"array": array, "sampling_rate": value.get("sampling_rate")}
    source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    if source is None:
        raise ConfigError('an audio cell needs "array", "bytes" or "path"')
    try:
        samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors: RuntimeError/LibsndfileError, with its own message
        raise ConfigError(
            f"cannot decode audio {value.get('path') or 'bytes'} ({e}); a clip soundfile reads is needed"
        ) from e
    return {"array": samples, "sampling_rate": rate}


def media_loader(inputs: Any, collator: MediaCollator) -> Any:
    """mteb's DataLoader with our collation: `datasets.Audio` columns read undecoded (no torchcodec), rows
    batched by `collator`, mteb's order and batch size kept."""
    from datasets import Audio
    from torch.utils.data import DataLoader

    dataset = inputs.dataset
    features = getattr(dataset, "features", None) or {}
    for column, feature in features.items():
        if isinstance(feature, Audio) and feature.decode:
            dataset = dataset.cast_column(column, Audio(decode=False))
    return DataLoader(dataset, batch_size=inputs.batch_size or 1, collate_fn=collator, shuffle=False)
