"""The media processor of a run whose model has towers, shared by the objectives that train one
(contrastive, fine-tuning): the checkpoint's image settings with the run's pixel budget and clip length,
and the `preprocessor_config.json` the run's model directory carries."""

from __future__ import annotations

import json
from typing import Any

from ml_collections import ConfigDict

from bidirlm_jax.data.media.images import read_preprocessor_config
from bidirlm_jax.data.media.items import MediaProcessor, media_processor


def run_processor(config: ConfigDict, settings: ConfigDict, model: Any, tokenizer: Any) -> MediaProcessor:
    """The run's media processor; `settings` is the objective's section (`template`, `max_pixels` — 0: the
    checkpoint's —, `max_seconds`)."""
    options = {"template": settings.template, "max_seconds": settings.max_seconds}
    if getattr(model, "vision", None) is not None and settings.max_pixels:
        options["max_pixels"] = settings.max_pixels
    preprocessor = read_preprocessor_config(config.model.init_from) if config.model.init_from else None
    return media_processor(model, tokenizer, preprocessor=preprocessor, **options)


def processor_files(config: ConfigDict, processor: MediaProcessor | None) -> dict[str, str]:
    """`preprocessor_config.json` for the run's model: `init_from`'s (the inference settings the towers came
    with), else the run's own image settings."""
    if processor is None or processor.vision is None:
        return {}
    settings = read_preprocessor_config(config.model.init_from) if config.model.init_from else {}
    settings = settings or processor.vision.settings.to_preprocessor_config()
    return {"preprocessor_config.json": json.dumps(settings, indent=2) + "\n"}
