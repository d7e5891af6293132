"""The ways a variant directory is made from others: the attention mode switched, two models merged, a
training run's latest checkpoint exported, an encoder composed with vision and audio specialists into
BidirLM-Omni. Each writes an HF directory atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.merge.omni_recipe import OmniRecipe


def switch_attention(src: str | os.PathLike, dst: str | os.PathLike, attention: str) -> Path:
    """`dst`: the HF directory `src` with its config in `attention` mode; every other file (weights,
    tokenizer) hard-linked where the file system allows, else copied — bit for bit either way."""
    from bidirlm_jax.io.hf_config import set_attention_mode

    src = Path(src)
    with atomic_directory(dst) as tmp:
        for file in sorted(src.iterdir()):
            if file.is_dir() or file.name == "config.json":
                continue
            try:
                os.link(file, tmp / file.name)
            except OSError:
                shutil.copy2(file, tmp / file.name)
        config = set_attention_mode(json.loads((src / "config.json").read_text()), attention)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(dst)


def merge_with_base(
    adapted: str | os.PathLike, base: str | os.PathLike, dst: str | os.PathLike, *, base_weight: float = 0.5
) -> Path:
    """`dst` = (1 − base_weight)·adapted + base_weight·base, streamed tensor by tensor; the adapted model gives
    the layout, config (bidirectional) and tokenizer (with its mask token)."""
    from bidirlm_jax.merge import MergeModel, MergeSpec, merge_checkpoints

    spec = MergeSpec(
        (MergeModel(str(adapted), 1.0 - base_weight), MergeModel(str(base), base_weight)), attention="bidirectional"
    )
    merge_checkpoints(spec, dst, progress=False)
    return Path(dst)


def compose_omni(
    text: str | os.PathLike,
    vision: str | os.PathLike,
    audio: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
    settings: OmniRecipe | None = None,
) -> Path:
    """`dst`: BidirLM-Omni composed from the text encoder and the vision (Qwen3-VL) and audio (Qwen3-ASR)
    specialists (`merge.compose`): backbones merged with `weights` (vision, text, audio; the paper's 1/3
    each), towers carried; `settings` fills in what the paper leaves open."""
    from bidirlm_jax.merge import MergeModel, MergeSpec, merge_checkpoints

    models = tuple(MergeModel(str(path), w) for path, w in zip((vision, text, audio), weights, strict=True))
    recipe = (settings or OmniRecipe()).replace(vision=str(vision), audio=str(audio))
    merge_checkpoints(MergeSpec(models, compose=recipe), dst, progress=False)
    return Path(dst)


def run_to_hf(
    workdir: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    attention: str = "bidirectional",
    tokenizer_from: str | os.PathLike | None = None,
) -> Path:
    """The latest checkpoint of a training run as an HF directory with the run's tokenizer (the one it saved in
    `WORKDIR/model/`, with MNTP's mask token; else `tokenizer_from`'s)."""
    from bidirlm_jax.io.companions import companion_files
    from bidirlm_jax.io.hf import from_pretrained, save_pretrained

    workdir = Path(workdir)
    model = from_pretrained(workdir, attention=attention, dtype="float32")
    files = companion_files(workdir)
    if not any(f.name == "tokenizer.json" for f in files.files) and tokenizer_from is not None:
        files = companion_files(tokenizer_from)
    return save_pretrained(model, dst, extra_files=files)
