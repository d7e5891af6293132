"""Compiled memory of the media contrastive steps at the paper's batch: the image–text GradCache step of
`configs/contrastive.py:qwen3-vl-2b` (Qwen3-VL-2B) and the Omni step of `:omni-2.5b` (BidirLM-Omni-2.5B).

Each step is the engine's own (`train.step` around the contrastive objective's GradCache gradient, as
`train.objectives.contrastive.build` makes it: chunks of 16 rows, media rows unpacked; clipping and AdamW,
state donated), with the preset's runtime (bidirectional, bf16 compute, fp32 master weights, remat `full`,
scanned layers) and frozen towers (no optimizer state), lowered on abstract inputs (`jax.ShapeDtypeStruct`:
nothing is allocated) and compiled for one device of this machine. The batch has the shapes the training
pipeline (`data.pairs.PairBatches` → `data.media.collate(fixed=True)`) gives every batch of a run: 512 rows
of 512 tokens per role, and on the side that holds media (the queries here) an image slot at the training
pixel budget (256·32·32 pixels: 1024 patches of 1536 values) or a clip slot of 30 s (3000 mel frames); a
side or dataset without media carries no slot. The Omni run has three batch shapes: text batches (7 hard
negatives per query), image and audio batches (none); each is compiled.
XLA's `memory_analysis()` gives arguments (state and batch; outputs alias the state) and temporaries.

    .venv/bin/python benchmarks/media_memory.py [--models qwen3-vl-2b omni-2.5b] [--batch 512] [--layers 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from measure import Bench
from peers import memory_row

from bidirlm_jax.configs.contrastive import get_config
from bidirlm_jax.data.media.audio import HOP, SAMPLING_RATE
from bidirlm_jax.io.hf_config_omni import omni_config_from_hf
from bidirlm_jax.io.params import param_count
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.towers.qwen3_vl.config import Qwen3VLConfig
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.testing.omni import OMNI_2_5B
from bidirlm_jax.train import trainable as trainable_lib
from bidirlm_jax.train.architecture import tower_patterns
from bidirlm_jax.train.gradcache import contrastive_loss_and_grads
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import StateLayout
from bidirlm_jax.train.step import jit_step, make_step_fn

OUT = Path(__file__).parent / "out" / "media_memory.json"
MODELS = ("qwen3-vl-2b", "omni-2.5b")
GIB = 2**30


def model_config(name: str, layers: int):
    """The preset's architecture (BidirLM-Omni-2.5B's released shape; Qwen3-VL-2B's = its text stack and
    vision tower with Qwen3-VL-2B's DeepStack taps), cut to `layers` text layers and tower blocks (0: all)."""
    omni = omni_config_from_hf(OMNI_2_5B)
    if layers:
        text = omni.text.replace(num_layers=layers, layer_types=omni.text.layer_types[:layers])
        vision = dataclasses.replace(omni.vision, depth=layers, deepstack_visual_indexes=(0,))
        omni = dataclasses.replace(omni, text=text, vision=vision, audio=omni.audio.replace(encoder_layers=layers))
    if name == "omni-2.5b":
        return omni
    taps = (5, 11, 17) if not layers else (0,)
    return Qwen3VLConfig(text=omni.text, vision=dataclasses.replace(omni.vision, deepstack_visual_indexes=taps))


def abstract_batch(config, b: int, k: int, length: int, patches: int, frames: int, media: tuple[str, ...]) -> dict:
    """Every key a fixed-shape contrastive batch of the run holds: ids, mask and positions for each role
    (query, positive, negative), and the `media` kinds' slots on the queries (the side that holds them; a text
    batch holds none)."""
    sds = jax.ShapeDtypeStruct
    text = {
        "input_ids": ((length,), jnp.int32),
        "attention_mask": ((length,), jnp.int32),
        "positions": ((3, length), jnp.int32),
    }
    slots = {
        "image": {
            "pixel_values": ((patches, config.vision.patch_dim), jnp.float32),
            "vision_coords": ((patches, 2), jnp.int32),
            "vision_interp_index": ((patches, 4), jnp.int32),
            "vision_interp_weight": ((patches, 4), jnp.float32),
            "vision_lengths": ((1,), jnp.int32),
        },
        "audio": {
            "input_features": ((config.audio.num_mel_bins, frames), jnp.float32),
            "audio_lengths": ((), jnp.int32),
        }
        if getattr(config, "audio", None) is not None
        else {},
    }
    batch = {"dataset": sds((b,), jnp.int32), "truncated": sds((b,), jnp.int32)}
    for role, lead in (("query", (b,)), ("positive", (b,)), ("negative", (b, k))):
        keys = dict(text)
        for kind in media if role == "query" else ():
            keys |= slots[kind]
        batch |= {f"{role}_{key}": sds(lead + shape, dtype) for key, (shape, dtype) in keys.items()}
    return batch


def media_step(name: str, config, *, batch: int, negatives: int, media: tuple[str, ...], runtime: Runtime):
    """The engine's contrastive step of preset `name` for `config` (towers frozen): (jitted step, state
    layout, abstract batch, mesh, facts of the batch), on one device of this machine."""
    c = get_config(name)
    c.optim.frozen = tower_patterns(config, runtime)
    tx, schedule = make_optimizer(c.optim, c.train.steps)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = StateLayout(config, tx, mesh, seed=0, runtime=runtime, trainable=trainable_lib.from_config(c.optim))
    con = c.contrastive
    settings = dict(chunk_size=con.chunk_size, temperature=con.temperature, pooling=con.pooling, gather=con.gather)

    def grad_fn(graphdef, params, batch, rng):
        loss, grads, metrics = contrastive_loss_and_grads(graphdef, params, batch, rng, pack=False, **settings)
        metrics = dict(metrics)
        return loss, grads, metrics.pop("tokens"), metrics

    patches = -(-(con.max_pixels // 16**2) // 4) * 4  # the pixel budget's patches in whole merged tokens
    chunk = 2 * config.audio.n_window if getattr(config, "audio", None) is not None else 1
    frames = -(-int(con.max_seconds * SAMPLING_RATE) // HOP // chunk) * chunk
    example = abstract_batch(config, batch, negatives, c.data.seq_len, patches, frames, media)
    step = jit_step(
        make_step_fn(layout.graphdef, grad_fn, tx, schedule, trainable=layout.trainable), layout.shardings, mesh
    )
    facts = dict(patches=patches, frames=frames if chunk > 1 else 0, chunk_size=con.chunk_size)
    return step, layout, example, mesh, facts


def compiled_memory(name: str, *, batch: int, negatives: int, layers: int, media: tuple[str, ...]) -> dict:
    config = model_config(name, layers)
    runtime = Runtime(attention="bidirectional", dtype="bfloat16", remat="full", scan_layers=True)
    start = time.perf_counter()
    step, layout, example, mesh, facts = media_step(
        name, config, batch=batch, negatives=negatives, media=media, runtime=runtime
    )
    with jax.set_mesh(mesh):
        row = memory_row(step.lower(layout.abstract, example).compile().memory_analysis())
    batch_bytes = sum(x.size * x.dtype.itemsize for x in example.values())
    return dict(
        row,
        batch_gib=batch_bytes / GIB,
        total_gib=row["temp_gib"] + row["argument_gib"],
        compile_s=time.perf_counter() - start,
        params=param_count(config),
        **facts,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch", type=int, default=512, help="pairs per step (the paper's 512)")
    p.add_argument("--layers", type=int, default=0, help="cut text layers and tower blocks to this many (0: all)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    bench = Bench()  # the memory figures do not depend on the load; the compile seconds do
    print(f"media contrastive steps, batch {args.batch}, bf16 compute, remat full, scanned; GiB = 2^30")
    results = {}
    for name in args.models:
        kinds = (("text", 7, ()), ("image", 0, ("image",)), ("audio", 0, ("audio",)))
        for kind, k, media in kinds if name == "omni-2.5b" else kinds[1:2]:
            label = f"{name}, {kind} batch ({k} negatives)"
            m = compiled_memory(name, batch=args.batch, negatives=k, layers=args.layers, media=media)
            bench.note_load()
            results[label] = m
            print(
                f"  {label}: {m['params'] / 1e9:.2f}B params; temp {m['temp_gib']:.2f} GiB, arguments "
                f"{m['argument_gib']:.2f} GiB (the batch {m['batch_gib']:.2f}), total {m['total_gib']:.2f} GiB; "
                f"compiled in {m['compile_s']:.0f} s (load {bench.loads[-1]:.1f})"
            )
    bench.finish(args.out, dict(batch=args.batch, layers=args.layers, results=results))


if __name__ == "__main__":
    main()
