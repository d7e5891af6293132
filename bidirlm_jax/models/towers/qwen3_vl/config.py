"""Qwen3-VL configs: the vision tower's (transformers' `Qwen3VLVisionConfig` field names) and the whole
model's (text + vision + special token ids). How either runs (dtypes, kernel, scanned blocks) is the
`models.runtime.Runtime` the model is built with, one for text and tower.

`io/hf_config_vision.py` reads both from a checkpoint's config.json; the models read only these fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.layers import ACTIVATIONS

LAYER_NORM_EPS = 1e-6  # transformers hard-codes it for every LayerNorm of the tower and its mergers


@dataclass(frozen=True)
class VisionConfig:
    """Architecture of a Qwen3-VL vision tower. The defaults are transformers'
    `Qwen3VLVisionConfig` defaults (what a config.json that omits a field means); Qwen3-VL-2B's tower is
    depth 24, width 1024, MLP 4096, output 2048, taps (5, 11, 17)."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    out_hidden_size: int = 3584
    hidden_act: str = "gelu_pytorch_tanh"
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304  # a square table, 48 × 48
    # Blocks after which a DeepStack merger runs; indexes ≥ depth are declared (their mergers carried) but never run.
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0

    def __post_init__(self):
        side = math.isqrt(self.num_position_embeddings)
        checks = [
            (min(self.depth, self.hidden_size, self.num_heads, self.out_hidden_size) > 0, "sizes must be positive"),
            (self.hidden_size % self.num_heads == 0, f"hidden_size {self.hidden_size} not a multiple of num_heads"),
            (self.head_dim % 4 == 0, f"head_dim {self.head_dim} must be a multiple of 4 (2-D rotary pairs)"),
            (side * side == self.num_position_embeddings, "num_position_embeddings must be a square"),
            (self.hidden_act in ACTIVATIONS, f"hidden_act {self.hidden_act!r} not one of {sorted(ACTIVATIONS)}"),
            (min(self.deepstack_visual_indexes, default=0) >= 0, "deepstack_visual_indexes must be ≥ 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid vision config: {message}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one processor row: channels × temporal patch × patch × patch (1536 for Qwen3-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (4 for a 2 × 2 merge)."""
        return self.spatial_merge_size**2

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def taps(self) -> tuple[tuple[int, int], ...]:
        """`(block, merger)` for each DeepStack merger that runs, in block order (as transformers emits them)."""
        index = self.deepstack_visual_indexes
        return tuple((block, index.index(block)) for block in range(self.depth) if block in index)

    def replace(self, **changes: Any) -> VisionConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Qwen3VLConfig:
    """A Qwen3-VL model: the text stack's config, the tower's, and the special token ids (transformers'
    `Qwen3VLConfig` defaults, Qwen's tokenizer)."""

    text: ModelConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # (key, JSON value) of config.json fields no model reads, carried into exports ("vision_config": the
    # tower's such fields, e.g. initializer_range), as `ModelConfig.extra` carries the text model's.
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.text.mrope_section is None:
            raise ConfigError("a Qwen3-VL text config needs an mrope_section (rope_parameters.mrope_section)")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"the vision tower's out_hidden_size {self.vision.out_hidden_size} must equal the text "
                f"hidden_size {self.text.hidden_size}"
            )

    def replace(self, **changes: Any) -> Qwen3VLConfig:
        return dataclasses.replace(self, **changes)
