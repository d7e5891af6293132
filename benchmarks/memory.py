"""Compiled memory of the MNTP training step at 8192 tokens, and the largest batch each chip size fits.

The step is the engine's own (`train.step`: forward, backward, clipping, AdamW, state donated) on the
MNTP objective (`losses.mntp.make_mntp_loss`, sparse or dense head), lowered on abstract
inputs (`jax.ShapeDtypeStruct`: nothing is allocated) and compiled for one device of this machine;
XLA's `memory_analysis()` gives the bytes of arguments (fp32 params, Adam moments, the batch),
outputs (aliased to the arguments: the state is donated) and temporaries (gradients, activations,
kernel scratch). The batch is a packed MNTP batch (`input_ids`, `segment_ids`, `positions`,
`attention_mask`, `maskable`), bidirectional attention, bf16 compute.

XLA's CPU scheduler does not keep rematerialised forwards next to their backward in an unrolled stack
(a toy stack of MLPs shows the same bytes with and without `jax.checkpoint`), so on CPU only scanned
layers (`--scan`, `scan_layers=True`) show what remat saves; GPU and TPU schedulers are memory-aware.

On CPU attention runs the XLA `chunked` kernel (query blocks: linear memory). TPU splash and GPU
flash kernels keep their blocks on chip, so their step needs about `attn` less: the temporaries of one
layer's chunked attention, forward and backward, at the model's shape (one layer's are live at a time).

Largest batch per device, FSDP over N devices: with A the argument bytes and T(b) the temporaries at
per-device batch b (linear, fitted from b = 1 and 2), a device holds A/N + T(b) − 4P(1 − 1/N) (its
share of the state and of the fp32 gradients, P parameters; FSDP's gathered bf16 layer weights are
not counted), which must fit in `usable × nominal` bytes (default 90 %, the rest for the runtime).

    .venv/bin/python benchmarks/memory.py [--models gemma3-270m ...] [--remat full save_dots] [--scan]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from measure import Bench

from bidirlm_jax.io.params import param_count
from bidirlm_jax.kernels import xla
from bidirlm_jax.kernels.masks import MaskSpec, Segments
from bidirlm_jax.losses.mntp import make_mntp_loss
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.train.config import base_config
from bidirlm_jax.train.objectives.base import token_sum_grads
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import StateLayout
from bidirlm_jax.train.step import jit_step, make_step_fn

MODELS = ("gemma3-270m", "gemma3-1b", "qwen3-0.6b", "qwen3-1.7b")
HEADS = ("sparse", "dense")  # the MNTP head measured: `mntp.sparse` True / False
CHIPS_GB = (16, 32, 80, 141)
MASK_IDS = {"gemma3": 4, "qwen3": 151_663}
GB = 1e9


def abstract_batch(batch: int, seq: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A packed MNTP batch's shapes and dtypes (what `data.packing` yields)."""
    shape = (batch, seq)
    ints = ("input_ids", "segment_ids", "positions", "attention_mask")
    return {**{k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ints}, "maskable": jax.ShapeDtypeStruct(shape, bool)}


def compiled_memory(
    name: str,
    *,
    batch: int,
    seq: int,
    remat: str,
    sparse: bool,
    scan_layers: bool = False,
    attention_impl: str = "auto",
    **overrides,
) -> dict[str, float]:
    """Bytes XLA plans for one MNTP step of preset `name` (`overrides`: its architecture's) — arguments, outputs,
    temporaries — and compile seconds."""
    config = get_preset(name, **overrides)
    run = dict(remat=remat, scan_layers=scan_layers, attention_impl=attention_impl)
    runtime = Runtime(attention="bidirectional", dtype="bfloat16", **run)
    optim = base_config().optim
    tx, schedule = make_optimizer(optim, total_steps=1000)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = StateLayout(config, tx, mesh, seed=0, runtime=runtime)
    loss = make_mntp_loss(mask_id=MASK_IDS[config.family], ratio=0.3, vocab_size=config.vocab_size, sparse=sparse)
    example = abstract_batch(batch, seq)
    step = jit_step(make_step_fn(layout.graphdef, token_sum_grads(loss), tx, schedule), layout.shardings, mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step.lower(layout.abstract, example)
    lower_s = time.perf_counter() - start
    analysis = lowered.compile().memory_analysis()
    return {
        "temp": analysis.temp_size_in_bytes,
        "argument": analysis.argument_size_in_bytes,
        "output": analysis.output_size_in_bytes,
        "alias": analysis.alias_size_in_bytes,
        "lower_s": lower_s,
        "compile_s": time.perf_counter() - start - lower_s,
    }


def attention_temp(name: str, seq: int, batch: int = 1) -> float:
    """Temporaries of one global layer's chunked attention (forward + backward) at the model's shape, bf16."""
    config = get_preset(name)
    q = jax.ShapeDtypeStruct((batch, seq, config.num_heads, config.head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, seq, config.num_kv_heads, config.head_dim), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    valid = jax.ShapeDtypeStruct((batch, seq), bool)

    def loss(q, k, v, valid, ids):
        out = xla.chunked(q, k, v, MaskSpec(None, None), Segments(valid, ids, True), scale=1.0,
                          block=config.attention_block_q)  # fmt: skip
        return out.astype(jnp.float32).sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, valid, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def largest_batch(one: dict, two: dict, params: int, chip_gb: float, *, devices: int, usable: float) -> int:
    """Per-device batch whose state share + temporaries fit `usable × chip_gb` (module docstring)."""
    per_row = max(two["temp"] - one["temp"], 1.0)
    batch_args = one["argument"] - (two["argument"] - one["argument"])  # the state alone
    fixed = batch_args / devices + one["temp"] - per_row - 4 * params * (1 - 1 / devices)
    return max(int((usable * chip_gb * GB - fixed) // per_row), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--remat", nargs="+", default=["full", "save_dots"])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--fsdp", type=int, default=8, help="devices the state is split over, besides one")
    parser.add_argument("--usable", type=float, default=0.9, help="fraction of a chip's memory the step may use")
    parser.add_argument("--scan", action="store_true", help="scanned layers (config.scan_layers)")
    parser.add_argument("--attention-impl", default="auto", help="config.attention_impl (xla: dense scores)")
    parser.add_argument("--no-fit", action="store_true", help="compile batch 1 only (no per-chip batch)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "memory.json"))
    args = parser.parse_args()
    bench = Bench()  # the memory figures do not depend on the load; the compile seconds do
    overrides = dict(attention_impl=args.attention_impl, **({"scan_layers": True} if args.scan else {}))
    layout = "scanned" if args.scan else "unrolled"
    rows = []
    print(f"MNTP step, seq {args.seq}, batch 1, bf16 compute, fp32 state, {layout} layers, "
          f"{jax.devices()[0].platform}; GB = 1e9 bytes; largest batch per device on one | {args.fsdp} devices")  # fmt: skip
    chips = "".join(f"{f'{c}GB':>9}" for c in CHIPS_GB)
    print(f"{'model':<13}{'head':<7}{'remat':<10}{'params':>8}{'temp':>8}{'attn':>7}{'args':>7}{'compile':>9}{chips}")
    for name in args.models:
        params = param_count(get_preset(name))
        attn = attention_temp(name, args.seq)
        for remat in args.remat:
            for head in args.heads:
                kw = dict(seq=args.seq, remat=remat, sparse=head == "sparse", **overrides)
                one = compiled_memory(name, batch=1, **kw)
                row = dict(model=name, head=head, remat=remat, layout=layout, params=params, attention_temp=attn,
                           batch1=one)  # fmt: skip
                fits = ""
                if not args.no_fit:
                    two = compiled_memory(name, batch=2, **kw)
                    row["batch2"] = two
                    row["largest_batch"] = {
                        devices: {
                            c: largest_batch(one, two, params, c, devices=devices, usable=args.usable) for c in CHIPS_GB
                        }
                        for devices in (1, args.fsdp)
                    }
                    best = row["largest_batch"]
                    fits = "".join(f"{f'{best[1][c]}|{best[args.fsdp][c]}':>9}" for c in CHIPS_GB)
                rows.append(row)
                print(
                    f"{name:<13}{head:<7}{remat:<10}{params / 1e9:>7.2f}B{one['temp'] / GB:>8.2f}{attn / GB:>7.2f}"
                    f"{one['argument'] / GB:>7.2f}{one['compile_s']:>8.0f}s{fits}",
                    flush=True,
                )
    summary = dict(seq=args.seq, fsdp=args.fsdp, usable=args.usable, layout=layout, models=rows)
    bench.finish(args.out, json.loads(json.dumps(summary, default=lambda x: np.asarray(x).tolist())))


if __name__ == "__main__":
    main()
