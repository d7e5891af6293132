"""HF -> bidirlm -> HF conversion of a >= 1 GB random checkpoint: time and peak RSS vs a plain read.

Each measurement runs in a fresh subprocess so peak RSS (ru_maxrss) belongs to that step alone:
- `read`: safetensors reads every tensor into memory (the I/O floor a converter cannot beat);
- `convert`: `from_pretrained` (one tensor at a time onto the JAX CPU device) then `save_pretrained`
  (streamed into shards). Target: peak RSS <= 1.2 x checkpoint + 300 MB.

    .venv/bin/python benchmarks/convert.py [--layers 24]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = {
    "imports": "import bidirlm_jax, safetensors.numpy",
    "read": "from bidirlm_jax.io.shards import ShardReader\nr = ShardReader(SRC)\nfor k in r.keys(): r.get(k)",
    "convert": "m = bidirlm_jax.from_pretrained(SRC)\nbidirlm_jax.save_pretrained(m, DST)",
}


def _make_checkpoint(path: Path, layers: int) -> int:
    """A Qwen3-shaped fp32 checkpoint written by transformers itself (about 43 MB per layer + embeddings)."""
    import torch
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=32_000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _measure(step: str, src: Path, dst: Path) -> dict:
    code = f"""
import resource, time, json
SRC, DST = {str(src)!r}, {str(dst)!r}
import bidirlm_jax, safetensors.numpy
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
{STEPS[step]}
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "import_mb": base / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        size = _make_checkpoint(src, args.layers)
        results = {step: _measure(step, src, Path(tmp) / f"dst-{step}") for step in ("read", "convert")}
    mb = size / 2**20
    print(f"checkpoint: {mb:,.0f} MB fp32 ({args.layers} layers)")
    print(f"{'step':<10}{'seconds':>9}{'peak RSS MB':>13}{'RSS after imports':>19}")
    for step, r in results.items():
        print(f"{step:<10}{r['seconds']:>9.2f}{r['peak_mb']:>13,.0f}{r['import_mb']:>19,.0f}")
    ratio = results["convert"]["seconds"] / results["read"]["seconds"]
    budget = 1.2 * mb + 300
    print(f"convert / read time: {ratio:.2f}x; peak RSS {results['convert']['peak_mb']:,.0f} MB vs budget {budget:,.0f} MB "
          f"(1.2 x checkpoint + 300 MB): {'ok' if results['convert']['peak_mb'] <= budget else 'OVER'}")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
