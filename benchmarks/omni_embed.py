"""Omni embedding throughput (items/s, CPU, fp32): our `encode` on a BidirLM-Omni directory against
transformers on the same weights, for text items, image items and audio items.

The model has BidirLM-Omni-2.5B's widths (text 2048 with 16/8 heads and MLP 6144, Qwen3-VL-2B's vision tower,
Qwen3-ASR-1.7B's AuT) cut to `--layers` text layers, tower blocks and encoder layers, random weights, the
media test tokenizer's 1,024-word vocabulary; it is written in the released layout (`config.json` as the
remote code spells it, one safetensors file) and loaded with `bidirlm_jax.from_pretrained`, as a user would
load the release. transformers has no class for that layout (the release's remote code is not shipped here),
so the peer is the composition the parity tests use as the oracle (`testing.omni.reference`):
`Qwen3VLModel` with `is_causal: false` and `sdpa` attention (text stack, vision tower, M-RoPE, DeepStack) fed
at the audio placeholders by `Qwen3OmniMoeAudioEncoder` one clip at a time with whole-clip attention (the
release's audio path). The peer's embeddings are checked against ours before timing.

Items: standard-library docstring paragraphs (text), scikit-image's photographs at the default pixel budget
(image; at the Omni run's pixel budget, 256·32·32, so at most 256 tokens), spoken sentences (espeak-ng, `data.media.speech`) or, without it, noise clips of the same lengths (audio); each embedded
in the released chat template. Ours is timed as `encode` end to end: rendering (tokenizing, resizing and
patchifying, log-mel features) included, one item per row, rows bucketed. The peer is timed on the arrays our
renderer made (the same items in the same order and batches, each batch padded to its longest row), mean
pooling over the mask and normalising included, rendering excluded — so the ratio understates ours by the
rendering share, which is printed beside it. First calls (compiling) are printed, not in the ratios.

    .venv/bin/python benchmarks/omni_embed.py [--layers 2 --items 16 --batch-size 8 --iters 3]
    (quick: --items 4 --iters 1)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from measure import Bench

import bidirlm_jax
from bidirlm_jax.data.batching import bucket_lengths, packed_batches
from bidirlm_jax.data.media.collate import collate
from bidirlm_jax.data.media.items import media_processor
from bidirlm_jax.data.media.samples import CAPTIONS, sample_image
from bidirlm_jax.data.stdlib_text import stdlib_docstrings
from bidirlm_jax.embed.encode import encode
from bidirlm_jax.io.tokenizer import load_tokenizer
from bidirlm_jax.testing import media, omni, qwen3_asr, qwen3_vl

OUT = Path(__file__).parent / "out" / "omni_embed.json"
MAX_LENGTH = 512
PIXELS = 256 * 32 * 32  # configs/contrastive.py:omni-2.5b's max_pixels


def build(path: Path, layers: int):
    """transformers' Qwen3-VL model and AuT encoder at the Omni widths (random), and their release directory."""
    text = dict(qwen3_vl.TEXT, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers)
    text.update(num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[24, 20, 20])
    vision = dict(qwen3_vl.VISION, depth=layers, hidden_size=1024, intermediate_size=4096, num_heads=16)
    vision.update(
        out_hidden_size=2048, num_position_embeddings=2304, deepstack_visual_indexes=list(range(min(3, layers)))
    )
    config = transformers.Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=qwen3_vl.IMAGE,
        video_token_id=qwen3_vl.VIDEO,
        vision_start_token_id=qwen3_vl.VISION_START,
        vision_end_token_id=qwen3_vl.VISION_END,
        attn_implementation="sdpa",
    )
    config.text_config.is_causal = False
    vl = qwen3_vl.qwen3_vl_model(config)
    audio = qwen3_asr.omni_audio_config(
        encoder_layers=layers, encoder_attention_heads=16, encoder_ffn_dim=4096, d_model=1024,
        downsample_hidden_size=480, output_dim=2048, n_window_infer=800,
    )  # fmt: skip
    audio._attn_implementation = "sdpa"
    encoder = qwen3_asr.build_encoder(audio)
    omni.save_release(vl, encoder, path)
    media.media_tokenizer().save_pretrained(path)
    return vl, encoder


def items_of(kind: str, n: int) -> list:
    rng = np.random.default_rng(0)
    if kind == "text":
        paragraphs = [p.strip() for _, d in stdlib_docstrings() for p in d.split("\n\n") if len(p.strip()) > 40]
        return [paragraphs[i][:600] for i in rng.permutation(len(paragraphs))[:n]]
    if kind == "image":
        names = sorted(CAPTIONS)
        return [{"image": sample_image(names[i % len(names)])} for i in range(n)]
    if shutil.which("espeak-ng"):
        from bidirlm_jax.data.media.speech import spoken_pairs

        return [clip for clip, _ in spoken_pairs(variants=-(-n // 8))[:n]]  # 8 sentences, several voicings
    print("  espeak-ng is not installed: noise clips of 2-6 s stand in for speech (the work is the same)")
    return [{"audio": {"array": rng.normal(0, 0.1, int(rng.uniform(2, 6) * 16000)).astype(np.float32),
                       "sampling_rate": 16000}} for _ in range(n)]  # fmt: skip


def peer_batches(rendered: list, batch_size: int) -> list[tuple[list[int], dict]]:
    """Our encode's grouping (longest first, `batch_size` per batch), each batch padded to its longest row, as
    the oracle's inputs."""
    order = sorted(range(len(rendered)), key=lambda i: -len(rendered[i].ids))
    out = []
    for lo in range(0, len(order), batch_size):
        index = order[lo : lo + batch_size]
        rows = [rendered[i] for i in index]
        length = max(len(r.ids) for r in rows)
        ids = np.zeros((len(rows), length), np.int64)
        mask = np.zeros_like(ids)
        for row, r in enumerate(rows):
            ids[row, : len(r.ids)], mask[row, : len(r.ids)] = r.ids, 1
        kwargs = {}
        if rows[0].patches is not None:
            kwargs.update(pixel_values=np.concatenate([r.patches for r in rows]), grids=[r.grid for r in rows])
        if rows[0].features is not None:
            kwargs.update(features=[r.features for r in rows], frames=[r.features.shape[1] for r in rows])
        out.append((index, dict(ids=ids, mask=mask, **kwargs)))
    return out


def slots(rendered: list, processor, batch_size: int) -> dict[str, tuple[int, int]]:
    """Positions each side computes, (ours, peer), for tokens, patches and mel frames: ours read off the batches
    `encode` builds (text items packed by `data.batching.packed_batches`, media items one per row by
    `data.media.collate`), the peer's tokens padded to each batch's longest row, its patches and frames unpadded
    (transformers packs them)."""
    order = sorted(rendered, key=lambda r: -len(r.ids))
    batches = [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
    rows = min(batch_size, 1 << (len(order) - 1).bit_length())  # encode's rows per batch
    ours = {"tokens": 0, "patches": 0, "frames": 0}
    if all(r.patches is None and r.features is None for r in rendered):
        packed = packed_batches([r.ids for r in rendered], rows=rows, buckets=bucket_lengths(MAX_LENGTH), pad=0)
        ours["tokens"] = sum(b.inputs["input_ids"].size for b in packed)
    else:
        for b in batches:
            arrays = collate(b, processor, rows=rows, max_length=MAX_LENGTH)
            ours["tokens"] += arrays["input_ids"].size
            pixels, mel = arrays.get("pixel_values"), arrays.get("input_features")
            ours["patches"] += 0 if pixels is None else pixels.shape[0] * pixels.shape[1]
            ours["frames"] += 0 if mel is None else mel.shape[0] * mel.shape[2]
    peer = {
        "tokens": sum(len(b) * len(b[0].ids) for b in batches),
        "patches": sum(len(r.patches) for r in rendered if r.patches is not None),
        "frames": sum(r.features.shape[1] for r in rendered if r.features is not None),
    }
    return {k: (ours[k], peer[k]) for k in ours if peer[k]}


def peer_embed(vl, encoder, batches: list, n: int) -> np.ndarray:
    out = np.zeros((n, vl.config.text_config.hidden_size), np.float32)
    for index, inputs in batches:
        hidden = omni.reference(vl, encoder, **inputs)
        mask = inputs["mask"][..., None]
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out[index] = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    return out


def measure(bench: Bench, kind: str, model, processor, vl, encoder, args) -> dict:
    """One kind of item: render once for the peer, a first call of ours, the agreement, interleaved rounds."""
    items = items_of(kind, args.items)
    start = time.perf_counter()
    rendered = [processor.render(item, MAX_LENGTH) for item in items]
    render_s = time.perf_counter() - start
    batches = peer_batches(rendered, args.batch_size)
    kw = dict(batch_size=args.batch_size, max_length=MAX_LENGTH, progress=False)
    start = time.perf_counter()
    ours = encode(model, processor, items, **kw)
    first_s = time.perf_counter() - start
    with torch.no_grad():
        theirs = peer_embed(vl, encoder, batches, len(items))
    error = float(np.abs(ours - theirs).max())
    assert error < 1e-3, f"{kind}: our embeddings and the oracle's differ by {error:.2e}"
    tokens = sum(len(r.ids) for r in rendered) / len(items)
    computed = slots(rendered, processor, args.batch_size)
    padding = ", ".join(f"{k} {o:,} vs {p:,}" for k, (o, p) in computed.items())
    print(f"{kind}: {tokens:.0f} tokens per item; positions computed, ours vs the peer: {padding}; rendering "
          f"{render_s:.2f} s; ours first call {first_s:.1f} s (compiling); embeddings agree to {error:.1e}")  # fmt: skip

    def run_peer():
        with torch.no_grad():
            peer_embed(vl, encoder, batches, len(items))

    ours_name, peer_name = f"ours {kind}", f"transformers {kind}"
    rows = bench.rounds({ours_name: lambda: encode(model, processor, items, **kw), peer_name: run_peer}, args.iters)
    ratio = bench.show_ratio(ours_name, peer_name, f"{kind}: transformers / ours")
    rates = {side: len(items) / rows[name]["best"] for side, name in (("ours", ours_name), ("transformers", peer_name))}
    print(f"  {kind}: ours {rates['ours']:.2f} items/s, transformers {rates['transformers']:.2f} items/s (best rounds)")
    return dict(
        tokens_per_item=tokens,
        positions_computed=computed,
        render_s=render_s,
        first_call_s=first_s,
        max_abs_difference=error,
        items_per_s=rates,
        ratio=ratio,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="text layers, vision blocks and AuT layers")
    p.add_argument("--items", type=int, default=16, help="items of each kind")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=3, help="interleaved warm rounds per kind")
    p.add_argument("--kinds", nargs="+", default=["text", "image", "audio"], choices=["text", "image", "audio"])
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    bench = Bench(threads={"torch": torch.get_num_threads()})
    print(f"Omni widths, {args.layers} layers per stack, fp32, batch {args.batch_size}, {args.items} items per kind")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "omni"
        vl, encoder = build(path, args.layers)
        model = bidirlm_jax.from_pretrained(path)
        processor = media_processor(model, load_tokenizer(path), max_pixels=PIXELS)
        kinds = {kind: measure(bench, kind, model, processor, vl, encoder, args) for kind in args.kinds}
    result = bench.finish(args.out, dict(layers=args.layers, items=args.items, batch_size=args.batch_size, kinds=kinds))
    print(json.dumps({k: round(v["ratio"]["paired_median"], 2) for k, v in result["kinds"].items()}))


if __name__ == "__main__":
    main()
