"""The audio tower's config: the architecture fields of transformers' `audio_config` and its attention pattern.

`io/hf_config_audio.py` reads it from a checkpoint's config.json. `audio_attention` is the one behaviour
the checkpoints themselves do not say: transformers' `Qwen3ASREncoder`/`Qwen3OmniMoeAudioEncoder`
attend within windows of `n_window_infer` frames ("window"), the released BidirLM-Omni remote code
within the whole clip ("clip"); the two agree on clips up to `n_window_infer` frames.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bidirlm_jax.audio_tokens import conv_len
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.layers import ACTIVATIONS

AUDIO_ATTENTION = ("window", "clip")


@dataclass(frozen=True)
class AudioConfig:
    """Architecture (transformers' field names) and attention pattern of one AuT encoder."""

    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    output_dim: int  # width of the projector's output: the text model's hidden size
    n_window: int  # a chunk is 2·n_window mel frames
    n_window_infer: int  # "window" attention spans this many frames (a multiple of 2·n_window)
    num_mel_bins: int = 128
    downsample_hidden_size: int = 480  # conv stem channels
    activation_function: str = "gelu"  # encoder MLP and projector; the stem always uses exact GELU
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which every AuT implementation keeps
    # Which positions attend to which (see the module docstring); how the encoder runs (dtypes, kernel,
    # scanned layers) is the `models.runtime.Runtime` it is built with.
    audio_attention: str = "window"

    def __post_init__(self):
        sizes = (
            self.d_model,
            self.encoder_layers,
            self.encoder_attention_heads,
            self.encoder_ffn_dim,
            self.output_dim,
            self.n_window,
            self.num_mel_bins,
            self.downsample_hidden_size,
        )
        checks = [
            (min(sizes) > 0, f"sizes must be positive, got {sizes}"),
            (
                self.d_model % self.encoder_attention_heads == 0,
                f"d_model {self.d_model} is not a multiple of {self.encoder_attention_heads} heads",
            ),
            (
                self.n_window_infer >= 2 * self.n_window and self.n_window_infer % (2 * self.n_window) == 0,
                f"n_window_infer {self.n_window_infer} must be a positive multiple of 2·n_window = {2 * self.n_window}",
            ),
            (
                self.audio_attention in AUDIO_ATTENTION,
                f"audio_attention {self.audio_attention!r} not in {AUDIO_ATTENTION}",
            ),
            (
                self.activation_function in ACTIVATIONS,
                f"activation_function {self.activation_function!r} not in {sorted(ACTIVATIONS)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid audio config: {message}")

    @property
    def chunk_frames(self) -> int:
        """Mel frames per chunk (2·n_window)."""
        return 2 * self.n_window

    @property
    def chunk_tokens(self) -> int:
        """Tokens out of one full chunk (13 for n_window 50, 25 for 100)."""
        return conv_len(self.chunk_frames)

    @property
    def window_tokens(self) -> int:
        """Tokens per "window" attention block: whole chunks spanning `n_window_infer` frames."""
        return self.chunk_tokens * (self.n_window_infer // self.chunk_frames)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def stem_features(self) -> int:
        """Channels × frequency bins after the stem (the input width of `conv_out`)."""
        return self.downsample_hidden_size * conv_len(self.num_mel_bins)

    def replace(self, **changes: Any) -> AudioConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Qwen3ASRConfig:
    """A Qwen3-ASR model: the text stack's config, the audio tower's and the audio placeholder id
    (transformers' `Qwen3ASRConfig` default, Qwen3-ASR's tokenizer); `extra` keeps the source's other
    top-level config.json fields (JSON-encoded), which an export writes back."""

    text: ModelConfig
    audio: AudioConfig
    audio_token_id: int = 151676
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.audio.output_dim != self.text.hidden_size:
            raise ConfigError(
                f"the audio tower's output_dim {self.audio.output_dim} must equal the text hidden_size "
                f"{self.text.hidden_size}"
            )

    def replace(self, **changes: Any) -> Qwen3ASRConfig:
        return dataclasses.replace(self, **changes)
