"""transformers' AuT audio encoders as the reference for the audio tower: tiny random ones, never downloaded.

The oracle is `Qwen3OmniMoeAudioEncoder` (the AuT layout, projector inside) called one clip at a time,
as the released BidirLM-Omni runs it (transformers' batched call pads single-chunk clips and is
batch-dependent). transformers counts `_get_feat_extract_output_lengths` with 13 tokens per full
chunk, right for n_window 50 only; for other windows `reference_tokens` hands it the per-chunk valid
indices and windows (`valid_indices`, `cu_seqlens`, inputs its forward accepts), so the layers are
still transformers' own.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen3OmniMoeAudioEncoderConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

from bidirlm_jax.audio_tokens import chunk_tokens, conv_len

CLIP_WINDOW = 10**6  # an `n_window_infer` past every test clip: transformers' windows become whole clips


# The tiny AuT every audio test builds (transformers' field names).
TINY_AUDIO = dict(
    num_mel_bins=128,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    d_model=32,
    downsample_hidden_size=8,
    output_dim=64,
    n_window=50,
    n_window_infer=200,
)


def omni_audio_config(**overrides) -> Qwen3OmniMoeAudioEncoderConfig:
    kw = dict(
        **TINY_AUDIO,
        max_source_positions=1500,
        conv_chunksize=500,
    )
    kw.update(overrides)
    config = Qwen3OmniMoeAudioEncoderConfig(**kw)
    config._attn_implementation = "eager"
    return config


def build_encoder(config: Qwen3OmniMoeAudioEncoderConfig, seed: int = 0) -> Qwen3OmniMoeAudioEncoder:
    """A random encoder with every parameter perturbed: biases (conv ones included: zero conv biases hide
    the chunk-boundary effect) `0.3·randn`, weights `0.1·randn`, norm scales `1 + 0.1·randn`."""
    torch.manual_seed(seed)
    encoder = Qwen3OmniMoeAudioEncoder(config).eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            is_scale = name.endswith("weight") and ("norm" in name or "ln_post" in name)
            p.copy_((1.0 if is_scale else 0.0) + (0.3 if name.endswith("bias") else 0.1) * torch.randn_like(p))
    return encoder


def tower_tensors(encoder: Qwen3OmniMoeAudioEncoder, prefix: str = "audio_tower.") -> dict[str, np.ndarray]:
    """The encoder's weights as a checkpoint holds them under `prefix`."""
    return {prefix + k: v.detach().numpy() for k, v in encoder.state_dict().items()}


def reference_tokens(encoder: Qwen3OmniMoeAudioEncoder, features: np.ndarray, attention: str) -> np.ndarray:
    """[tokens, output_dim] for one clip `features [mel_bins, L]` under "window" or "clip" attention."""
    config = encoder.config
    length = features.shape[1]
    n = 2 * config.n_window
    kwargs = {}
    if conv_len(n) != 13:  # transformers' count is wrong here: give it the per-chunk one
        chunks = [n] * (length // n) + ([length % n] if length % n else [])
        c = conv_len(n)
        kwargs["valid_indices"] = torch.tensor([k * c + j for k, m in enumerate(chunks) for j in range(conv_len(m))])
        total = chunk_tokens(length, config.n_window)
        block = total if attention == "clip" else c * (config.n_window_infer // n)
        bounds = list(range(0, total, block)) + [total]
        kwargs["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
    window = encoder.n_window_infer
    encoder.n_window_infer = CLIP_WINDOW if attention == "clip" else window
    try:
        with torch.no_grad():
            out = encoder(torch.from_numpy(features), feature_lens=torch.tensor([length]), **kwargs)
    finally:
        encoder.n_window_infer = window
    return out.last_hidden_state.numpy()


def asr_config(**text_overrides):
    """The tiny Qwen3-ASR of the omni notes (§4): the 2-layer tower above (n_window 50, the window count
    transformers gets right) under a 2-layer Qwen3 of width 64; audio placeholder id 1004."""
    from transformers import Qwen3ASRConfig

    audio = dict(
        model_type="qwen3_asr_encoder",
        **TINY_AUDIO,
    )
    text = dict(
        model_type="qwen3",
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    text.update(text_overrides)
    config = Qwen3ASRConfig(audio_config=audio, text_config=text, audio_token_id=1004, pad_token_id=0, eos_token_id=1)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.audio_config._attn_implementation = "eager"
    return config


def build_asr_model(config, seed: int = 0):
    """A random `Qwen3ASRForConditionalGeneration` with every parameter perturbed as `build_encoder` does
    (norm scales around 1, biases 0.3·randn, weights 0.1·randn)."""
    from transformers import Qwen3ASRForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3ASRForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = name.endswith("weight") and ("norm" in name or "ln_post" in name)
            p.copy_((1.0 if is_scale else 0.0) + (0.3 if name.endswith("bias") else 0.1) * torch.randn_like(p))
    return model


AUDIO_PAD, AUDIO_START, AUDIO_END = 1004, 1005, 1006  # stand-in ids of `asr_config`'s tiny vocabulary


def asr_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, input_features, input_features_mask) as the -hf processor gives them:
    three text rows (right-, left- and un-padded, 42 tokens) holding clips of 137, 250 and 300 frames
    (18, 33 and 39 placeholders at n_window 50), features zero past each clip and padded to whole chunks."""
    lengths, t = np.array([137, 250, 300]), 42
    counts = chunk_tokens(lengths, 50)
    rows = [
        [5, AUDIO_START, *[AUDIO_PAD] * counts[0], AUDIO_END, 7],  # right padding
        [AUDIO_START, *[AUDIO_PAD] * counts[1], AUDIO_END, 9],  # left padding
        [5, AUDIO_START, *[AUDIO_PAD] * counts[2], AUDIO_END],  # no padding
    ]
    ids, mask = np.zeros((3, t), np.int64), np.zeros((3, t), np.int64)
    for b, row in enumerate(rows):
        at = slice(t - len(row), t) if b == 1 else slice(0, len(row))
        ids[b, at], mask[b, at] = row, 1
    frames = np.arange(300)[None, :] < lengths[:, None]
    features = np.random.default_rng(0).standard_normal((3, 128, 300)).astype(np.float32) * frames[:, None]
    return ids, mask, features, frames.astype(np.int64)


_THINKER_PREFIXES = (
    ("model.language_model.", "thinker.model."),
    ("model.audio_tower.", "thinker.audio_tower."),
    ("model.multi_modal_projector.linear_1.", "thinker.audio_tower.proj1."),
    ("model.multi_modal_projector.linear_2.", "thinker.audio_tower.proj2."),
    ("lm_head.", "thinker.lm_head."),
)


def save_thinker_layout(hf_dir, path) -> None:
    """The -hf checkpoint in `hf_dir` rewritten in the original Qwen3-ASR layout at `path`: everything under
    `thinker.`, the projector inside the tower, the parts' configs under `thinker_config` (the text config
    named as the original names it)."""
    import json
    from pathlib import Path

    from safetensors.numpy import load_file, save_file

    hf_dir, path = Path(hf_dir), Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in load_file(hf_dir / "model.safetensors").items():
        hf, original = next((h, o) for h, o in _THINKER_PREFIXES if key.startswith(h))
        tensors[original + key.removeprefix(hf)] = value
    save_file(tensors, path / "model.safetensors")
    hf = json.loads((hf_dir / "config.json").read_text())
    rope = {"rope_type": "default", "mrope_section": [6, 5, 5], "interleaved": True}
    text = dict(hf["text_config"], model_type="qwen3_asr_text", rope_scaling=rope)
    audio = dict(hf["audio_config"], model_type="qwen3_asr_audio_encoder")
    thinker = dict(audio_config=audio, text_config=text, audio_token_id=hf["audio_token_id"])
    thinker["model_type"] = "qwen3_asr_thinker"
    config = dict(model_type="qwen3_asr", architectures=["Qwen3ASRForConditionalGeneration"], thinker_config=thinker)
    (path / "config.json").write_text(json.dumps(config))
