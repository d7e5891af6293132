"""Compile time of the MNTP training step against depth: unrolled layers vs scanned ones (`scan_layers`).

Same step as `benchmarks/memory.py` (forward, backward, clipping, AdamW; bf16 compute, remat `full`,
sparse head), lowered on abstract inputs and compiled for one device of this machine, at 4 layers and
at 28 layers (the depth of Qwen3-0.6B/1.7B) of each model's shape. Scanned layers trace and compile
one layer whatever the depth; unrolled layers one per layer.

    .venv/bin/python benchmarks/compile.py [--models qwen3-0.6b gemma3-270m] [--layers 4 28] [--seq 2048]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from measure import Bench
from memory import compiled_memory

from bidirlm_jax.models.config import FULL, SLIDING
from bidirlm_jax.models.presets import get_preset


def depth(name: str, layers: int) -> dict:
    """Overrides giving preset `name` `layers` layers, keeping its pattern of layer types."""
    pattern = get_preset(name).layer_types
    if len(set(pattern)) == 1:
        return {"num_layers": layers, "layer_types": (pattern[0],) * layers}
    period = pattern.index(FULL) + 1  # Gemma3: five sliding layers, then a global one
    return {"num_layers": layers, "layer_types": tuple(SLIDING if (i + 1) % period else FULL for i in range(layers))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen3-0.6b", "gemma3-270m"])
    parser.add_argument("--layers", nargs="+", type=int, default=[4, 28])
    parser.add_argument("--seq", type=int, default=2048, help="compile time hardly depends on it")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "compile.json"))
    args = parser.parse_args()
    bench = Bench()
    rows = []
    print(f"{'model':<13}{'layers':>7}{'layout':>10}{'trace s':>9}{'compile s':>11}{'temp GB':>9}")
    for name in args.models:
        for layers in args.layers:
            for scan in (False, True):
                m = compiled_memory(name, batch=1, seq=args.seq, remat="full", sparse=True, scan_layers=scan,
                                    **depth(name, layers))  # fmt: skip
                layout = "scanned" if scan else "unrolled"
                rows.append(dict(model=name, layers=layers, layout=layout, **m))
                print(f"{name:<13}{layers:>7}{layout:>10}{m['lower_s']:>9.1f}{m['compile_s']:>11.1f}"
                      f"{m['temp'] / 1e9:>9.2f}; load {bench.note_load():.1f}", flush=True)  # fmt: skip
    bench.finish(args.out, dict(seq=args.seq, compiles=rows))


if __name__ == "__main__":
    main()
