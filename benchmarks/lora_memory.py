"""Compiled memory of a LoRA training step against full fine-tuning, for the four paper sizes, and how large a
model fits a chip either way.

Both steps are the engine's own (`train.step`: forward, backward, clipping, AdamW, state donated) on the MNTP
objective at the paper's per-device batch (1 × 8192 tokens, the MNTP stage's; packed, sparse head,
bidirectional, bf16 compute, remat `full`, scanned layers — `benchmarks/memory.py`'s setting), lowered on
abstract inputs (`jax.ShapeDtypeStruct`: nothing is allocated) and compiled for one device of this machine:
- full: fp32 master weights and Adam moments for every parameter (what `bidirlm train` keeps);
- LoRA (`train.lora`): the base frozen in bf16, rank-16 adapters (alpha 32, dropout 0.05, on q/k/v/o/gate/up/down:
  LLM2Vec's recipe) in fp32 with their Adam moments; gradients stop at the base.
XLA's `memory_analysis()` gives arguments (the state and the batch; outputs alias them) and temporaries
(gradients, activations, scratch); a step needs about their sum on the device.

XLA's CPU backend has no bf16 matmul: it converts bf16 operands to fp32, and hoists the conversion of the
frozen bf16 weights out of the layer scan — an fp32 copy of every stacked weight and of the [V, d] head, which a
GPU or TPU (native bf16 dots) never makes. (Full fine-tuning shows none: its weights are fp32 already, and XLA
drops the fp32 → bf16 → fp32 round trip, allowed excess precision.) On CPU the LoRA step's temporaries are
therefore taken from the same step with the base stored in fp32 (the activations and adapter gradients, without
the upcast copies), its arguments from the bf16-base step; `temp_cpu_bf16` keeps the raw figure.

How large a model fits: the sum is fitted over the four sizes as `bytes ≈ a·P + c` (P parameters; a is the
state's bytes per parameter plus the gradient's, c the activations of one 8192-token row, which grow with width
and depth far more slowly than P) and solved for `usable × chip` bytes. The activations are not exactly a
function of P, so this is an extrapolation along these families' shapes, not a measurement.

    .venv/bin/python benchmarks/lora_memory.py [--models gemma3-270m ...] [--seq 8192] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from measure import Bench
from memory import MASK_IDS, MODELS, abstract_batch

from bidirlm_jax.io.params import param_count
from bidirlm_jax.losses.mntp import make_mntp_loss
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.train import lora as lora_train
from bidirlm_jax.train.config import base_config
from bidirlm_jax.train.objectives.base import token_sum_grads
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import StateLayout
from bidirlm_jax.train.step import jit_step, make_step_fn

CHIPS_GB = (16, 32, 80)
GB = 1e9


def compiled_memory(name: str, *, lora: bool, seq: int, rank: int, base_dtype: str = "bfloat16") -> dict[str, float]:
    """Bytes XLA plans for one MNTP step of preset `name`, full or LoRA (base stored as `base_dtype`), and the
    compile seconds."""
    config = get_preset(name)
    runtime = Runtime(attention="bidirectional", dtype="bfloat16", remat="full", scan_layers=True)
    c = base_config()
    c.lora.update(rank=rank if lora else 0, alpha=2.0 * rank, dropout=0.05, base_dtype=base_dtype)
    tx, schedule = make_optimizer(c.optim, total_steps=1000)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    loss = make_mntp_loss(mask_id=MASK_IDS[config.family], ratio=0.3, vocab_size=config.vocab_size, sparse=True)
    grad_fn = token_sum_grads(loss)
    if lora:
        chosen = lora_train.trainable(c.optim)
        factory = lora_train.model_factory(
            lambda rngs: Transformer(config, runtime, rngs=rngs), lora_train.settings(c), base_dtype, chosen
        )
        layout = StateLayout(config, tx, mesh, seed=0, runtime=runtime, model_factory=factory, trainable=chosen)
        grad_fn = lora_train.adapter_grads(grad_fn, chosen, dropout=True)
    else:
        layout = StateLayout(config, tx, mesh, seed=0, runtime=runtime)
    example = abstract_batch(1, seq)
    step_fn = make_step_fn(layout.graphdef, grad_fn, tx, schedule, trainable=layout.trainable)
    step = jit_step(step_fn, layout.shardings, mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        analysis = step.lower(layout.abstract, example).compile().memory_analysis()
    trained = sum(
        x.size for p, x in jax.tree_util.tree_flatten_with_path(layout.abstract.params)[0] if "_lora" in str(p)
    )
    return {
        "temp": analysis.temp_size_in_bytes,
        "argument": analysis.argument_size_in_bytes,
        "total": analysis.temp_size_in_bytes + analysis.argument_size_in_bytes,
        "adapter_params": trained,
        "compile_s": time.perf_counter() - start,
    }


def largest_fit(params: list[float], totals: list[float], chip_gb: float, usable: float) -> float:
    """Parameters P with a·P + c = usable × chip, (a, c) fitted to (params, totals) by least squares."""
    a, c = np.polyfit(params, totals, 1)
    return max((usable * chip_gb * GB - c) / a, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--usable", type=float, default=0.9, help="fraction of a chip's memory the step may use")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "lora_memory.json"))
    args = parser.parse_args()
    bench = Bench()  # the memory figures do not depend on the load; the compile seconds do
    print(f"MNTP step, 1 x {args.seq} tokens, bf16 compute, remat full, scanned, {jax.devices()[0].platform}; GB = 1e9")
    print(f"{'model':<13}{'params':>8}{'mode':>6}{'adapters':>10}{'args':>8}{'temp':>8}{'total':>8}{'compile':>9}")
    rows = []
    for name in args.models:
        params = param_count(get_preset(name))
        for lora in (False, True):
            m = compiled_memory(name, lora=lora, seq=args.seq, rank=args.rank)
            if lora and jax.devices()[0].platform == "cpu":  # the CPU's bf16 upcasts (module doc)
                fp32_base = compiled_memory(name, lora=True, seq=args.seq, rank=args.rank, base_dtype="float32")
                m.update(temp_cpu_bf16=m["temp"], temp=fp32_base["temp"], total=m["argument"] + fp32_base["temp"])
            rows.append(dict(model=name, params=params, mode="lora" if lora else "full", **m))
            print(
                f"{name:<13}{params / 1e9:>7.2f}B{'lora' if lora else 'full':>6}{m['adapter_params'] / 1e6:>9.1f}M"
                f"{m['argument'] / GB:>8.2f}{m['temp'] / GB:>8.2f}{m['total'] / GB:>8.2f}{m['compile_s']:>8.0f}s",
                flush=True,
            )
    fits = {}
    if len(args.models) > 1:
        for mode in ("full", "lora"):
            chosen = [r for r in rows if r["mode"] == mode]
            p, t = [r["params"] for r in chosen], [r["total"] for r in chosen]
            fits[mode] = {c: largest_fit(p, t, c, args.usable) for c in CHIPS_GB}
            a, c = np.polyfit(p, t, 1)
            print(
                f"{mode}: total ≈ {a:.2f} B/param · P + {c / GB:.2f} GB; largest model on "
                + ", ".join(f"{chip} GB: {fits[mode][chip] / 1e9:.2f}B" for chip in CHIPS_GB)
            )
    summary = dict(seq=args.seq, rank=args.rank, usable=args.usable, models=rows, largest=fits)
    bench.finish(args.out, json.loads(json.dumps(summary, default=lambda x: np.asarray(x).tolist())))


if __name__ == "__main__":
    main()
