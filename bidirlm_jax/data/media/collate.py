"""Rendered items → one row-aligned batch of numpy model inputs, static shapes from a few buckets.

Every array's axis 0 is the row (one item per row), so GradCache's row chunking and the `batch` sharding
take media batches unchanged:
- `input_ids`, `attention_mask` int32 [B, T] (right padding; T a `bucket_lengths` length);
- `positions` int32 [B, 3, T]: M-RoPE positions, for models with a vision tower (`get_rope_index`);
- `pixel_values` float32 [B, P, patch_dim] and the `VisionLayout` fields `vision_coords`,
  `vision_interp_index`, `vision_interp_weight`, `vision_lengths` (row b: its image's patches, zero-padded
  to P, a bucket multiple of the merge unit), when a row holds an image;
- `input_features` float32 [B, mel_bins, F] and `audio_lengths` int32 [B] (frames; 0: no clip), F a
  `chunk_bucket` number of chunks, when a row holds a clip.
A short batch is filled with copies of its first item (dropped after), never an all-padding row.
`fixed=True` (training: one compiled step per dataset) pads to the largest shapes instead: T = max_length,
P = the pixel budget's patches, F = the maximum duration's frames, and the media keys of every tower the
processor has, whether or not this batch holds such media.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bidirlm_jax.audio_tokens import chunk_bucket
from bidirlm_jax.data.batching import bucket_for, bucket_lengths, pad_rows
from bidirlm_jax.data.media.audio import batch_features
from bidirlm_jax.data.media.items import MediaProcessor, RenderedItem
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.tokenizer import pad_id
from bidirlm_jax.models.towers.qwen3_vl.layout import vision_layout
from bidirlm_jax.models.towers.qwen3_vl.rope_index import get_rope_index

VISION_KEYS = ("pixel_values", "vision_coords", "vision_interp_index", "vision_interp_weight", "vision_lengths")
AUDIO_KEYS = ("input_features", "audio_lengths")
MEDIA_KEYS = ("positions", *VISION_KEYS, *AUDIO_KEYS)


def patch_bucket(patches: int) -> int:
    """Patches per row for a batch whose largest image has `patches`: a `bucket_lengths` step (a multiple of
    16, so of every merge unit), at most 1.5× the need past 64 patches (a power of two below)."""
    return bucket_for(patches, bucket_lengths(2 * max(patches, 1)))


def collate(
    items: Sequence[RenderedItem],
    processor: MediaProcessor,
    *,
    rows: int,
    max_length: int,
    fixed: bool = False,
    media: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """`items` (at most `rows`) as one batch of `rows` rows (see the module doc); with `fixed`, `media`
    ("image", "audio") names the media keys every batch carries."""
    items = [*items, *[items[0]] * (rows - len(items))]
    longest = max(len(i.ids) for i in items)
    length = max_length if fixed else bucket_for(longest, bucket_lengths(max_length))
    ids, mask = pad_rows([i.ids for i in items], length, pad_id(processor.tokenizer))
    batch: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
    vision, audio = processor.vision, processor.audio
    if vision is not None:
        grids = [i.grid for i in items if i.grid is not None]
        positions, _ = get_rope_index(
            ids, grids or None, mask, image_token_id=vision.image, spatial_merge_size=vision.merge_size
        )
        batch["positions"] = np.ascontiguousarray(positions.transpose(1, 0, 2)).astype(np.int32)
        if grids or (fixed and "image" in media):
            patches = vision.max_patches if fixed else patch_bucket(max(len(i.patches) for i in items if i.grid))
            batch.update(_vision_arrays(items, patches, vision))
    if audio is not None and (any(i.features is not None for i in items) or (fixed and "audio" in media)):
        empty = np.zeros((audio.mel_bins, 0), np.float32)
        features = [empty if i.features is None else i.features for i in items]
        chunk = 2 * audio.n_window
        chunks = -(-max(f.shape[1] for f in features) // chunk)
        frames = audio.max_frames if fixed else chunk * chunk_bucket(chunks)
        batch["input_features"], batch["audio_lengths"] = batch_features(features, multiple=chunk, frames=frames)
    return batch


def _vision_arrays(items: Sequence[RenderedItem], length: int, vision) -> dict[str, np.ndarray]:
    width = vision.settings.patch_dim
    merge, side = vision.merge_size, vision.grid_side
    pixels = np.zeros((len(items), length, width), np.float32)
    for row, item in zip(pixels, items):
        if item.patches is not None:
            if len(item.patches) > length:
                raise ConfigError(
                    f"an image resized to grid {item.grid} has {len(item.patches)} patches, more than the {length} a "
                    "row holds at this pixel budget (smart_resize scaled a small or very elongated image up past it); "
                    "lower min_pixels or crop the image"
                )
            row[: len(item.patches)] = item.patches
    layout = vision_layout([[i.grid] if i.grid else [] for i in items], length, merge=merge, side=side)
    return {
        "pixel_values": pixels,
        "vision_coords": layout.coords,
        "vision_interp_index": layout.interp_index,
        "vision_interp_weight": layout.interp_weight,
        "vision_lengths": layout.lengths,
    }
