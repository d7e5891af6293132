"""`gpu_check.py`'s media sections: the towers on this platform and the Omni contrastive step. (Imported by
`gpu_check.py`; running it does nothing.)

5. The Qwen3-VL vision tower (`vision_tower.towers`: Qwen3-VL-2B's widths) and the AuT encoder
   (`audio_tower.towers`: Qwen3-ASR-1.7B's) cut to a few blocks, random weights, fp32: our output on this
   platform against transformers' on the same weights (torch on the GPU where it has CUDA, else the CPU) as the
   largest error / the largest |reference| over valid tokens, and items/s of each side.
6. The Omni contrastive step (`configs/contrastive.py:omni-2.5b`, the engine's step around GradCache: bf16
   compute, fp32 master weights, remat full, scanned, towers frozen; smoke: `tiny-omni` at fp32) on a text
   batch (7 hard negatives), an image batch (the training pixel budget) and an audio batch (30 s clips), real
   arrays of the shapes a run feeds (`media_memory.abstract_batch`): s/step, pairs/s and peak device memory (the
   process's peak so far on a GPU, so it never falls from one kind of batch to the next; on CPU what XLA planned).
"""

from __future__ import annotations

import time

import jax
import numpy as np
import torch
from audio_tower import clips
from audio_tower import towers as audio_towers
from flax import nnx
from media_memory import media_step, model_config
from vision_tower import towers as vision_towers

from bidirlm_jax.audio_tokens import chunk_ids, chunk_tokens
from bidirlm_jax.data.media.audio import SAMPLING_RATE, audio_features, batch_features
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.towers.presets import get_tower_preset
from bidirlm_jax.models.towers.qwen3_vl.layout import vision_layout

PATCH_DIM, MERGE, SIDE = 1536, 2, 48  # Qwen3-VL-2B's patch rows, merge and position table


def _timed(fn, repeats: int = 3) -> tuple[object, float]:
    """(result, best seconds of `repeats` calls after a first one that compiles)."""
    out = jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return out, best


def relative(got, expected) -> float:
    """Largest |got − expected| over the largest |expected| (float64)."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))


def _torch_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def vision_numerics(depth: int, images: int, size: int) -> dict:
    theirs, ours = vision_towers(depth)
    side = size // 16
    grids = [(1, side, side)] * images
    patches = np.random.default_rng(0).uniform(-1, 1, (images * side * side, PATCH_DIM)).astype(np.float32)
    layout = vision_layout([grids], merge=MERGE, side=SIDE)
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, layout).tokens)
    x = jax.device_put(patches[None])
    got, ours_s = _timed(lambda: forward(state, x))
    device = _torch_device()
    theirs = theirs.to(device)
    pt, grid = torch.as_tensor(patches, device=device), torch.as_tensor(grids, device=device)

    def run_theirs():
        with torch.no_grad():
            out = theirs(pt, grid).pooler_output
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    expected, theirs_s = _timed(run_theirs)
    error = relative(np.asarray(got)[0], expected.cpu().numpy())
    return dict(items=images, error=error, ours_per_s=images / ours_s, theirs_per_s=images / theirs_s, torch=device)


def audio_numerics(layers: int, count: int, max_seconds: float) -> dict:
    encoder, projector, ours = audio_towers(layers)
    n_window = encoder.config.n_window
    items = [{"array": a, "sampling_rate": SAMPLING_RATE} for a in clips(count, max_seconds)]
    features, lengths = batch_features([audio_features(i).features for i in items], multiple=2 * n_window)
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda state, x, n, ids: nnx.merge(graphdef, state)(x, n, ids).tokens)
    x, n = jax.device_put(features), jax.device_put(lengths)
    ids = jax.device_put(chunk_ids(lengths, features.shape[2], 2 * n_window))  # as `Qwen3ASR.prepare` gives them
    got, ours_s = _timed(lambda: forward(state, x, n, ids))
    device = _torch_device()
    encoder, projector = encoder.to(device), projector.to(device)
    mask = (np.arange(features.shape[2])[None, :] < lengths[:, None]).astype(np.int64)
    pt, pmask = torch.as_tensor(features, device=device), torch.as_tensor(mask, device=device)

    def run_theirs():
        with torch.no_grad():
            out = projector(encoder(pt, pmask).last_hidden_state)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    expected, theirs_s = _timed(run_theirs)
    counts = chunk_tokens(lengths, n_window)
    valid = np.concatenate([row[:c] for row, c in zip(np.asarray(got), counts)])
    error = relative(valid, expected.cpu().numpy())
    return dict(items=count, error=error, ours_per_s=count / ours_s, theirs_per_s=count / theirs_s, torch=device)


def run_step(step, layout, example, data, mesh, steps: int) -> dict:
    """Compile the engine step `step` for `example` (abstract or concrete), run it once on `data` from a fresh
    state (the warm-up: its loss is the random init's), then `steps` timed runs on the same batch: seconds per
    step, compile seconds, peak device memory (CPU: what XLA planned), the first and the last loss."""
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        compiled = step.lower(layout.abstract, example).compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(layout.init(), data)
        first_loss = float(metrics["loss"])
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    if peak is None:
        analysis = compiled.memory_analysis()
        peak = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
    return dict(step_s=seconds, compile_s=compile_s, peak_gb=peak / 1e9, first_loss=first_loss,
                last_loss=float(metrics["loss"]))  # fmt: skip


def concrete_batch(example: dict, config, facts: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Arrays of `example`'s shapes as a run feeds them: each media slot's placeholders at the start of its
    row (an image at the pixel budget as a square grid, a clip of the slot's frames), the rest random words."""
    out = {}
    vision, audio = getattr(config, "vision", None), getattr(config, "audio", None)
    for key, spec in example.items():
        role, _, field = key.partition("_") if key.startswith(("query_", "positive_", "negative_")) else ("", "", key)
        if field == "input_ids":
            ids = rng.integers(10, config.text.vocab_size // 2, spec.shape)
            start = 0
            if f"{role}_input_features" in example:
                count = int(chunk_tokens(np.int64(facts["frames"]), audio.n_window))
                ids[..., start : start + count], start = config.audio_token_id, start + count
            if f"{role}_pixel_values" in example:
                count = facts["patches"] // MERGE**2
                ids[..., start : start + count] = config.image_token_id
            out[key] = ids.astype(np.int32)
        elif field == "attention_mask":
            out[key] = np.ones(spec.shape, np.int32)
        elif field == "positions":
            out[key] = np.broadcast_to(np.arange(spec.shape[-1], dtype=np.int32), spec.shape).copy()
        elif field in ("pixel_values", "input_features"):
            out[key] = rng.standard_normal(spec.shape).astype(np.float32)
        elif field == "audio_lengths":
            out[key] = np.full(spec.shape, facts["frames"], np.int32)
        elif field.startswith("vision_"):
            side = int(round(facts["patches"] ** 0.5))
            rows = int(np.prod(spec.shape[:1]))
            layout = vision_layout([[(1, side, side)]] * rows, facts["patches"], merge=vision.spatial_merge_size,
                                   side=int(round(vision.num_position_embeddings**0.5)))  # fmt: skip
            out[key] = getattr(layout, field[len("vision_") :]).reshape(spec.shape).astype(spec.dtype)
        else:  # dataset, truncated
            out[key] = np.zeros(spec.shape, spec.dtype)
    return out


def omni_steps(*, smoke: bool, batch: int, steps: int) -> dict:
    """Section 6: one compiled step per kind of batch, `steps` timed after a warm-up."""
    if smoke:
        config, runtime = get_tower_preset("tiny-omni"), Runtime(attention="bidirectional", scan_layers=True)
    else:
        config = model_config("omni-2.5b", 0)
        runtime = Runtime(attention="bidirectional", dtype="bfloat16", remat="full", scan_layers=True)
    name = "tiny-omni" if smoke else "omni-2.5b"
    results = {}
    for kind, negatives, media in (("text", 7, ()), ("image", 0, ("image",)), ("audio", 0, ("audio",))):
        step, layout, example, mesh, facts = media_step(
            name, config, batch=batch, negatives=negatives, media=media, runtime=runtime
        )
        data = concrete_batch(example, config, facts, np.random.default_rng(0))
        r = run_step(step, layout, example, data, mesh, steps)
        results[kind] = dict(step_s=r["step_s"], pairs_per_s=batch / r["step_s"], peak_gb=r["peak_gb"],
                             compile_s=r["compile_s"], loss=r["first_loss"], negatives=negatives, **facts)  # fmt: skip
    return results
