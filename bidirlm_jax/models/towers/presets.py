"""Tiny models with towers for the offline media presets, tests and notebooks (seconds on a CPU).

The text stack is `tiny-qwen3` widened to a 1024-token vocabulary whose ids 1000… hold Qwen's media and
chat markers in `io.tokenizer.MEDIA_TOKENS` order (`with_media_tokens(tokenizer, MEDIA_FIRST_ID)` builds
the matching tokenizer). Real-size runs start from a checkpoint (`model.init_from`), never from here.
"""

from __future__ import annotations

from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.towers.omni.config import OmniConfig
from bidirlm_jax.models.towers.qwen3_asr.config import AudioConfig, Qwen3ASRConfig
from bidirlm_jax.models.towers.qwen3_vl.config import Qwen3VLConfig, VisionConfig

MEDIA_FIRST_ID = 1000
_TEXT = get_preset("tiny-qwen3", vocab_size=1024)

TOWER_PRESETS: dict[str, Any] = {
    "tiny-qwen3-vl": Qwen3VLConfig(
        text=_TEXT.replace(mrope_section=(6, 5, 5)),
        vision=VisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=_TEXT.hidden_size,
            num_position_embeddings=64,
            deepstack_visual_indexes=(0,),
        ),
        image_token_id=MEDIA_FIRST_ID,
        video_token_id=MEDIA_FIRST_ID + 1,
        vision_start_token_id=MEDIA_FIRST_ID + 2,
        vision_end_token_id=MEDIA_FIRST_ID + 3,
    ),
    "tiny-qwen3-asr": Qwen3ASRConfig(
        text=_TEXT,
        audio=AudioConfig(
            d_model=32,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            output_dim=_TEXT.hidden_size,
            n_window=50,
            n_window_infer=400,
            downsample_hidden_size=8,
        ),
        audio_token_id=MEDIA_FIRST_ID + 4,
    ),
}
TOWER_PRESETS["tiny-omni"] = OmniConfig(  # both towers above under the M-RoPE text stack
    text=TOWER_PRESETS["tiny-qwen3-vl"].text,
    vision=TOWER_PRESETS["tiny-qwen3-vl"].vision,
    audio=TOWER_PRESETS["tiny-qwen3-asr"].audio,
    image_token_id=MEDIA_FIRST_ID,
    video_token_id=MEDIA_FIRST_ID + 1,
    vision_start_token_id=MEDIA_FIRST_ID + 2,
    vision_end_token_id=MEDIA_FIRST_ID + 3,
    audio_token_id=MEDIA_FIRST_ID + 4,
    audio_start_token_id=MEDIA_FIRST_ID + 5,
    audio_end_token_id=MEDIA_FIRST_ID + 6,
)


def get_tower_preset(name: str) -> Any:
    if name not in TOWER_PRESETS:
        raise ConfigError(f"unknown tower preset {name!r}; available: {', '.join(TOWER_PRESETS)}")
    return TOWER_PRESETS[name]
