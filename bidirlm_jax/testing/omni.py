"""A tiny random BidirLM-Omni in the released layout, and its transformers-built oracle; never downloaded.

The released `BidirLMOmniModel` has no transformers class, so the oracle composes transformers' own:
`Qwen3VLModel` with `is_causal: false` (text stack, vision tower, M-RoPE, DeepStack) fed, at the audio
placeholders, by `Qwen3OmniMoeAudioEncoder` called one clip at a time with whole-clip attention (the
release's audio path). Its state dict's keys (`language_model.*`, `visual.*`) plus the encoder's under
`audio_tower.` are the release's key layout, and `release_config` its config.json, spelled as the remote
config classes write it (legacy `rope_theta`/`rope_scaling`, `bidirlm_omni_*` sub-config types).
"""

from __future__ import annotations

import numpy as np
import torch

from bidirlm_jax.audio_tokens import chunk_tokens, release_tokens
from bidirlm_jax.testing import qwen3_asr, qwen3_vl

AUDIO_PAD, AUDIO_START, AUDIO_END = qwen3_asr.AUDIO_PAD, qwen3_asr.AUDIO_START, qwen3_asr.AUDIO_END
IMAGE, VISION_START, VISION_END = qwen3_vl.IMAGE, qwen3_vl.VISION_START, qwen3_vl.VISION_END
DEEPSTACK = (0, 1, 3)  # as the release: a tap past the tower's depth (3) declared, its merger carried


def vl_model(seed: int = 0):
    """The tiny bidirectional `Qwen3VLModel` whose text stack and vision tower the Omni model holds."""
    return qwen3_vl.qwen3_vl_model(qwen3_vl.qwen3_vl_config(causal=False, deepstack=DEEPSTACK), seed)


def audio_encoder(seed: int = 0):
    """The tiny AuT encoder (projector inside, output width 64 = the text width)."""
    return qwen3_asr.build_encoder(qwen3_asr.omni_audio_config(), seed)


def release_config(vl, encoder) -> dict:
    """A bidirlm_omni config.json for `vl`'s text stack and tower and `encoder` (any size), as the release spells one."""
    t = vl.config.text_config
    rope = t.rope_parameters
    text = dict(
        model_type="bidirlm_omni_text",
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        max_position_embeddings=t.max_position_embeddings,
        rope_theta=rope["rope_theta"],
        rope_scaling={"rope_type": "default", "mrope_section": list(rope["mrope_section"]), "mrope_interleaved": True},
        clf_pooling="late",
    )
    vision = {k: getattr(vl.config.vision_config, k) for k in (*qwen3_vl.VISION, "deepstack_visual_indexes")}
    vision.update(model_type="bidirlm_omni_vision", initializer_range=0.02)
    audio = {k: getattr(encoder.config, k) for k in (*qwen3_asr.TINY_AUDIO, "max_source_positions", "conv_chunksize")}
    audio.update(model_type="bidirlm_omni_audio")
    return dict(
        model_type="bidirlm_omni",
        architectures=["BidirLMOmniModel"],
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        image_token_id=IMAGE,
        video_token_id=qwen3_vl.VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        audio_token_id=AUDIO_PAD,
        audio_start_token_id=AUDIO_START,
        audio_end_token_id=AUDIO_END,
        text_weights_source="visual",
        tie_word_embeddings=True,
    )


def release_tensors(vl, encoder) -> dict[str, np.ndarray]:
    """The release's state dict: `language_model.*`, `visual.*` (every declared merger) and `audio_tower.*`."""
    return {**qwen3_vl.state_tensors(vl), **qwen3_asr.tower_tensors(encoder, "audio_tower.")}


def reference(
    vl, encoder, ids, mask, *, pixel_values=None, grids=None, features=None, frames=None, keep=None
) -> np.ndarray:
    """The oracle's final-normed hidden states [B, T, d]: each clip (`features` [clips, mel, frames] with
    `frames` valid frames each) through the encoder alone, its first `keep` tokens (default all; the
    release's `masked_scatter` keeps the first ones of a single clip) scattered into the text embeddings in
    order, then `Qwen3VLModel` on those embeddings with the images (positions from its `get_rope_index`)."""
    ids_t, mask_t = torch.as_tensor(ids), torch.as_tensor(mask)
    with torch.no_grad():
        embeds = vl.get_input_embeddings()(ids_t)
        if features is not None:
            keep = [None] * len(features) if keep is None else keep
            tokens = [
                qwen3_asr.reference_tokens(encoder, f[:, :n], "clip")[:k] for f, n, k in zip(features, frames, keep)
            ]
            slots = ids_t == AUDIO_PAD
            embeds = embeds.masked_scatter(slots[..., None], torch.as_tensor(np.concatenate(tokens)))
        b, t = ids.shape
        kwargs = {"position_ids": torch.arange(t).expand(3, b, t)}
        if pixel_values is not None:
            types = torch.as_tensor((ids == IMAGE).astype(np.int64))
            grid = torch.as_tensor(np.asarray(grids))
            kwargs["position_ids"], _ = vl.get_rope_index(ids_t, types, grid, attention_mask=mask_t)
            kwargs.update(pixel_values=torch.as_tensor(pixel_values), image_grid_thw=grid)
        out = vl(inputs_embeds=embeds, attention_mask=mask_t, **kwargs)
    return out.last_hidden_state.numpy()


def audio_run(length: int, n_window: int = 50, *, release: bool = False) -> list[int]:
    """`<|audio_start|>`, one placeholder per token of a clip of `length` frames (`release`: as many as
    BidirLM-Omni's processor counts), `<|audio_end|>`."""
    count = release_tokens(length) if release else chunk_tokens(length, n_window)
    return [AUDIO_START, *[AUDIO_PAD] * int(count), AUDIO_END]


def image_run(grid) -> list[int]:
    t, h, w = grid
    return [VISION_START, *[IMAGE] * (t * h * w // 4), VISION_END]


def save_release(vl, encoder, path) -> None:
    """A BidirLM-Omni directory in the release's layout: its config.json and one safetensors file."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(release_config(vl, encoder), indent=2))
    save_file({k: np.ascontiguousarray(v) for k, v in release_tensors(vl, encoder).items()}, path / "model.safetensors")


# BidirLM-Omni-2.5B's shape (omni notes §1): Qwen3-1.7B text, Qwen3-VL-2B's tower, Qwen3-ASR-1.7B's AuT.
OMNI_2_5B = {
    "model_type": "bidirlm_omni",
    "text_config": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rope_theta": 5e6,
        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
    },
    "vision_config": {
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    },
    "audio_config": {
        "d_model": 1024,
        "encoder_layers": 24,
        "encoder_attention_heads": 16,
        "encoder_ffn_dim": 4096,
        "output_dim": 2048,
        "n_window": 50,
        "n_window_infer": 800,
    },
}


def release_dir(path) -> None:
    """A tiny release directory at `path` as users receive one: weights and config (`save_release`), the media
    tokenizer and a `preprocessor_config.json` with a small pixel budget (32² to 64² pixels)."""
    import json

    from bidirlm_jax.testing import media

    save_release(vl_model(), audio_encoder(), path)
    media.media_tokenizer().save_pretrained(path)
    size = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    (path / "preprocessor_config.json").write_text(json.dumps({"size": size}))
