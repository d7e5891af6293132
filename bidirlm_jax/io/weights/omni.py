"""BidirLM-Omni's weight tables: the text model's, the vision tower's and the audio tower's (projector inside,
as the release keeps it), each only when the config holds that tower."""

from __future__ import annotations

from bidirlm_jax.io.weights.audio import audio_tables
from bidirlm_jax.io.weights.table import Table
from bidirlm_jax.io.weights.text import text_tables
from bidirlm_jax.io.weights.vision import vision_table
from bidirlm_jax.models.towers.omni.config import OmniConfig


def omni_tables(config: OmniConfig) -> tuple[Table, ...]:
    """What an unrolled `Omni(config)` reads and writes: the text tables under `text`, the vision tower's under
    `visual`, the audio tower's under `audio_tower`."""
    tables = [t.under("text") for t in text_tables(config.text)]
    if config.vision is not None:
        tables.append(vision_table(config.vision).under("visual"))
    if config.audio is not None:
        tables.extend(t.under("audio_tower") for t in audio_tables(config.audio, projector_outside=False))
    return tuple(tables)
