"""The BidirLM-Omni config: the text stack's, the vision tower's, the audio tower's and the special token ids.

Either tower may be absent (`without`): a model loaded for text alone, or for one modality, builds and
reads only what it runs. `io/hf_config_omni.py` reads and writes the released `bidirlm_omni` config.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.towers.qwen3_asr.config import AudioConfig
from bidirlm_jax.models.towers.qwen3_vl.config import VisionConfig


@dataclass(frozen=True)
class OmniConfig:
    """A BidirLM-Omni model; the token ids default to the released config's (Qwen3-VL's vision ids,
    Qwen3-ASR's audio ids)."""

    text: ModelConfig
    vision: VisionConfig | None
    audio: AudioConfig | None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    audio_token_id: int = 151676
    audio_start_token_id: int = 151669
    audio_end_token_id: int = 151670
    # (key, JSON value) of config.json fields no model reads (the sub-configs' own under their names),
    # carried into exports.
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.text.mrope_section is None:
            raise ConfigError("an Omni text config needs an mrope_section (rope_scaling.mrope_section)")
        if self.vision is not None and self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"the vision tower's out_hidden_size {self.vision.out_hidden_size} must equal the text "
                f"hidden_size {self.text.hidden_size}"
            )
        if self.audio is not None and self.audio.output_dim != self.text.hidden_size:
            raise ConfigError(
                f"the audio tower's output_dim {self.audio.output_dim} must equal the text hidden_size "
                f"{self.text.hidden_size}"
            )

    def without(self, *, vision: bool = False, audio: bool = False) -> OmniConfig:
        """This config with the vision tower (`vision=True`) and/or the audio tower (`audio=True`) dropped."""
        return self.replace(vision=None if vision else self.vision, audio=None if audio else self.audio)

    def replace(self, **changes: Any) -> OmniConfig:
        return dataclasses.replace(self, **changes)
