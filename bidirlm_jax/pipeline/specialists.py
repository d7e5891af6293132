"""Tiny vision and audio specialists that share the encoder's backbone, made offline for the Omni stage.

BidirLM-Omni merges Qwen3-1.7B with Qwen3-VL-2B and Qwen3-ASR-1.7B, specialists whose text stacks grew from
the same Qwen3 backbone while they learned to see or hear. Here each specialist starts as the demo's causal
base with a fresh tower beside it (`attach_tower`: a Qwen3-VL or Qwen3-ASR checkpoint whose text stack is
the base, bit for bit), then learns its modality: a contrastive run on image → caption or clip → transcript
pairs in which the tower and the backbone both train (`specialist_config`). Contrastive training stands in
for the specialists' generative pre-training, which this package does not do with media; the backbones
drift from the base as theirs did, which is what the composition averages.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from ml_collections import ConfigDict

from bidirlm_jax.configs.sizes import Size

MODALITIES = ("image", "audio")
_MROPE = {32: (6, 5, 5), 64: (12, 10, 10), 128: (24, 20, 20)}  # head_dim -> Qwen3-VL's section split


def tower_config(text, tokenizer, modality: str):
    """A Qwen3-VL (image) or Qwen3-ASR (audio) config around the text config `text`, its placeholder ids
    from `tokenizer` (a Qwen3 tokenizer with the chat and media markers), a small tower of the text width."""
    from bidirlm_jax.models.towers.qwen3_asr.config import AudioConfig, Qwen3ASRConfig
    from bidirlm_jax.models.towers.qwen3_vl.config import Qwen3VLConfig, VisionConfig

    ids = {
        name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
        for name in ("image_pad", "video_pad", "vision_start", "vision_end", "audio_pad")
    }
    if modality == "image":
        vision = VisionConfig(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=text.hidden_size,
            num_position_embeddings=64,  # 8 × 8 patches: the pixel budget's largest grid, resampled below it
            deepstack_visual_indexes=(0,),
        )
        return Qwen3VLConfig(
            text=text.replace(mrope_section=_MROPE[text.head_dim]),
            vision=vision,
            image_token_id=ids["image_pad"],
            video_token_id=ids["video_pad"],
            vision_start_token_id=ids["vision_start"],
            vision_end_token_id=ids["vision_end"],
        )
    audio = AudioConfig(
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=128,
        output_dim=text.hidden_size,
        n_window=50,
        n_window_infer=400,
        downsample_hidden_size=16,
    )
    return Qwen3ASRConfig(text=text, audio=audio, audio_token_id=ids["audio_pad"])


def attach_tower(base: Path, dst: Path, modality: str, size: Size, *, seed: int = 0) -> Path:
    """`dst`: a Qwen3-VL / Qwen3-ASR checkpoint whose text stack is the causal `base`'s weights and whose tower
    is freshly initialised, with the base's tokenizer (and for images a `preprocessor_config.json` at the
    stage's pixel budget)."""
    from flax import nnx

    from bidirlm_jax.data.media.images import ImageSettings
    from bidirlm_jax.io.companions import companion_files
    from bidirlm_jax.io.hf import from_pretrained, save_pretrained
    from bidirlm_jax.io.tokenizer import load_tokenizer
    from bidirlm_jax.models.towers.qwen3_asr.model import Qwen3ASR
    from bidirlm_jax.models.towers.qwen3_vl.model import Qwen3VL

    text = from_pretrained(base, attention="causal")
    config = tower_config(text.config, load_tokenizer(base), modality)
    model = (Qwen3VL if modality == "image" else Qwen3ASR)(config, text.runtime, rngs=nnx.Rngs(seed))
    nnx.update(model.text, nnx.state(text, nnx.Param))
    files = dst.parent / f"{dst.name}-files"  # the tokenizer and processor files that travel with it
    shutil.copytree(base, files, ignore=shutil.ignore_patterns("*.safetensors*", "config.json"))
    if modality == "image":
        budget = ImageSettings(min_pixels=size.max_pixels // 4, max_pixels=size.max_pixels)
        (files / "preprocessor_config.json").write_text(json.dumps(budget.to_preprocessor_config(), indent=2) + "\n")
    save_pretrained(model, dst, extra_files=companion_files(files))
    shutil.rmtree(files)
    return dst


def specialist_config(template: ConfigDict, init_from: Path, pairs: Path, size: Size, progress: bool) -> ConfigDict:
    """The specialist's run: contrastive on one modality's pairs, tower and backbone training, bidirectional
    (the attention the composed encoder reads it with), `template`'s optimizer settings."""
    c = copy.deepcopy(template)
    c.model.update(init_from=str(init_from), attention="bidirectional", towers=True)
    c.data.update(source="pairs", path=str(pairs), seq_len=size.omni_seq_len, global_batch_size=size.omni_batch, seed=0)
    c.contrastive.update(
        num_negatives=0,
        chunk_size=0,
        instructions="",
        max_pixels=size.max_pixels,
        max_seconds=size.max_seconds,
        train_towers=True,
        mask_duplicates=True,  # a batch repeats captions and transcripts: never count one as another's negative
    )
    c.optim.update(
        learning_rate=size.omni_learning_rate, warmup_steps=max(1, size.specialist_steps // 10), weight_decay=0.0
    )
    c.train.update(
        steps=size.specialist_steps,
        checkpoint_every=size.specialist_steps,
        log_every=max(1, size.specialist_steps // 20),
    )
    c.metrics.progress_bar = progress
    return c
