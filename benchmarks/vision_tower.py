"""Vision tower forward throughput (images/s, CPU, fp32): ours against transformers' `Qwen3VLVisionModel`
on the same images and weights.

The tower is Qwen3-VL-2B's shape (width 1024, 16 heads, MLP 4096, output 2048, a 48×48 position table)
cut to `--depth` blocks, with random weights and DeepStack taps after blocks 1–3 (three mergers run, as in
the 2B tower). Ours is jitted and compiled beforehand, theirs is torch with `sdpa`; the sides are interleaved
in rounds (`measure.Bench`: machine, load around every round, best / median of per-round ratios / CPU time).

    .venv/bin/python benchmarks/vision_tower.py [--images 4] [--size 224] [--rounds 7] [--depth 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
import torch
import transformers
from flax import nnx
from measure import Bench
from transformers.models.qwen3_vl import modeling_qwen3_vl as hf_vl

from bidirlm_jax.io.hf_config_vision import vision_config_from_hf
from bidirlm_jax.io.weights.vision import vision_from_tensors
from bidirlm_jax.models.towers.qwen3_vl.layout import vision_layout
from bidirlm_jax.testing import qwen3_vl as ref

TOWER_2B = dict(hidden_size=1024, num_heads=16, intermediate_size=4096, out_hidden_size=2048,
                num_position_embeddings=2304, patch_size=16, temporal_patch_size=2, spatial_merge_size=2)  # fmt: skip


def towers(depth: int):
    """transformers' tower (random weights) and ours holding the same weights."""
    config = transformers.Qwen3VLVisionConfig(**TOWER_2B, depth=depth, deepstack_visual_indexes=[1, 2, 3])
    config._attn_implementation = "sdpa"
    theirs = ref.randomize(hf_vl.Qwen3VLVisionModel(config))
    ours = vision_from_tensors(vision_config_from_hf(config.to_dict()), ref.state_tensors(theirs, "visual."))
    return theirs, ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4, help="images per forward")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (a multiple of 32)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--out", default=str(Path(__file__).parent / "out" / "vision_tower.json"))
    args = p.parse_args()
    bench = Bench(threads={"torch": torch.get_num_threads()})
    side = args.size // 16
    grids = [(1, side, side)] * args.images
    patches = np.random.default_rng(0).uniform(-1, 1, (args.images * side * side, 1536)).astype(np.float32)
    theirs, ours = towers(args.depth)
    layout = vision_layout([grids], merge=2, side=48)
    graphdef, state = nnx.split(ours)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x, layout).tokens

    x = jax.device_put(patches[None])
    pt, grid_t = torch.as_tensor(patches), torch.as_tensor(grids)

    def run_ours():
        forward(state, x).block_until_ready()

    def run_theirs():
        with torch.no_grad():
            theirs(pt, grid_t)

    with torch.no_grad():  # the two compute the same thing (the parity tests bound it at 1e-5 relative)
        expected = theirs(pt, grid_t).pooler_output.numpy()
    got = np.asarray(forward(state, x))[0]  # compiles too
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    assert error < 1e-4, f"ours and transformers' merged tokens differ by {error:.2e} relative"
    rows = bench.rounds({"ours": run_ours, "transformers": run_theirs}, args.rounds)
    for name, row in rows.items():
        print(f"  {name:<14}{args.images / row['best']:>7.2f} images/s best, {args.images / row['median']:.2f} median")
    bench.show_ratio("ours", "transformers")
    extra = dict(images=args.images, size=args.size, depth=args.depth, max_relative_difference=error)
    bench.finish(args.out, extra)


if __name__ == "__main__":
    main()
