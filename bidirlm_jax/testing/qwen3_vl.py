"""Tiny random transformers Qwen3-VL models (vision tower, whole model) as parity references; never downloaded.

Stand-in special ids in the 1024-token vocabulary: image 1000, video 1001, vision start 1002, vision end 1003.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from transformers.models.qwen3_vl import modeling_qwen3_vl as hf_vl

IMAGE, VIDEO, VISION_START, VISION_END = 1000, 1001, 1002, 1003
# Patch size 16 and temporal patch 2, so the converter's reshape of the real [D, 3, 2, 16, 16] kernel runs.
VISION = dict(
    depth=3,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=16,
)
TEXT = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5], "mrope_interleaved": True},
)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random at a scale that keeps activations O(1): the initialisers leave norms at 1
    and biases at 0, which would hide a misplaced norm weight or bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias") or p.ndim == 1:
                p.copy_(0.2 * noise)
            elif name.endswith("pos_embed.weight"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model.eval()


def vision_tower(deepstack=(0, 1), **overrides) -> hf_vl.Qwen3VLVisionModel:
    config = transformers.Qwen3VLVisionConfig(**{**VISION, **overrides}, deepstack_visual_indexes=list(deepstack))
    config._attn_implementation = "eager"
    return randomize(hf_vl.Qwen3VLVisionModel(config))


def qwen3_vl_config(*, causal: bool = True, deepstack=(0, 1)) -> transformers.Qwen3VLConfig:
    config = transformers.Qwen3VLConfig(
        text_config=dict(TEXT),
        vision_config=dict(VISION, deepstack_visual_indexes=list(deepstack)),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        attn_implementation="eager",
    )
    config.text_config.is_causal = causal  # transformers' bidirectional switch (create_causal_mask reads it)
    return config


def qwen3_vl_model(config: transformers.Qwen3VLConfig, seed: int = 0) -> hf_vl.Qwen3VLModel:
    return randomize(hf_vl.Qwen3VLModel(config), seed)


def state_tensors(model: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy() for k, v in model.state_dict().items()}
