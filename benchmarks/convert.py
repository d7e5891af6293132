"""HF -> bidirlm -> HF conversion of a >= 1 GB random checkpoint: time and peak RSS vs a plain read.

Each measurement runs in a fresh subprocess so its peak RSS (VmHWM) belongs to that step alone:
- `read`: safetensors' own loader reads every tensor into memory (the peer the issue names);
- `copy`: read every tensor and write it back out as a checkpoint (the I/O floor of a conversion);
- `convert`: `from_pretrained` (one tensor at a time onto the JAX CPU device) then `save_pretrained`
  (streamed into shards). Target: peak RSS <= 1.2 x checkpoint + 300 MB.

    .venv/bin/python benchmarks/convert.py [--layers 24 --iters 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import Bench

STEPS = {
    "read": "tensors = safetensors.numpy.load_file(SRC + '/model.safetensors')",
    "copy": "safetensors.numpy.save_file(safetensors.numpy.load_file(SRC + '/model.safetensors'), DST + '.safetensors')",
    "convert": "m = bidirlm_jax.from_pretrained(SRC)\nbidirlm_jax.save_pretrained(m, DST)",
}


_MAKE = """
import torch, transformers
config = transformers.Qwen3Config(
    vocab_size=32_000, hidden_size=1024, intermediate_size=3072, num_hidden_layers={layers},
    num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=False,
)
torch.manual_seed(0)
transformers.AutoModelForCausalLM.from_config(config).save_pretrained({path!r}, max_shard_size="100GB")
"""


def _make_checkpoint(path: Path, layers: int) -> int:
    """A Qwen3-shaped fp32 checkpoint written by transformers itself (about 43 MB per layer + embeddings),
    in its own process so that this one stays small (a child inherits nothing of its peak)."""
    subprocess.run([sys.executable, "-c", _MAKE.format(layers=layers, path=str(path))], check=True, capture_output=True)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _measure(step: str, src: Path, dst: Path) -> dict:
    code = f"""
import time, json
SRC, DST = {str(src)!r}, {str(dst)!r}
import bidirlm_jax, safetensors.numpy
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
base = hwm()
t = time.perf_counter()
{STEPS[step]}
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_mb": hwm(), "import_mb": base}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="24: a 1.40 GB checkpoint")
    parser.add_argument("--iters", type=int, default=1, help="interleaved rounds (medians reported)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "convert.json"))
    args = parser.parse_args()
    bench = Bench()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        size = _make_checkpoint(src, args.layers)
        runs = {step: [] for step in STEPS}
        steps = {
            step: lambda step=step: runs[step].append(_measure(step, src, Path(tmp) / f"dst-{step}")) for step in STEPS
        }
        bench.rounds(steps, args.iters)
    results = {step: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for step, rs in runs.items()}
    mb = size / 2**20
    print(f"checkpoint: {mb:,.0f} MB fp32 ({args.layers} layers)")
    print(f"{'step':<10}{'seconds':>9}{'peak RSS MB':>13}{'RSS after imports':>19}")
    for step, r in results.items():
        print(f"{step:<10}{r['seconds']:>9.2f}{r['peak_mb']:>13,.0f}{r['import_mb']:>19,.0f}")
    read, copy = (results["convert"]["seconds"] / results[s]["seconds"] for s in ("read", "copy"))
    budget = 1.2 * mb + 300
    print(
        f"convert time: {read:.2f}x read, {copy:.2f}x copy; peak RSS {results['convert']['peak_mb']:,.0f} MB vs budget {budget:,.0f} MB "
        f"(1.2 x checkpoint + 300 MB): {'ok' if results['convert']['peak_mb'] <= budget else 'OVER'}"
    )
    bench.finish(args.out, dict(steps=results, checkpoint_mb=mb))


if __name__ == "__main__":
    main()
