"""Forward-pass throughput on this machine: our jitted model vs transformers + torch (sdpa), same weights.

The benchmark model of the project (preset `bench-qwen3`: Qwen3-shaped, hidden 512, 8 layers, vocab
32k, tied, 41.6M parameters), fp32, batch 8 x seq 512, both attention modes. Target: >= 1.5x torch.

    .venv/bin/python benchmarks/forward.py [--batch 8 --seq 512 --iters 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from flax import nnx

import bidirlm_jax
from bidirlm_jax.io.hf_config import config_to_hf
from bidirlm_jax.models.presets import get_preset


def _best_of(fn, iters: int) -> float:
    fn()  # warm-up (compiles the jitted function)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    config = get_preset("bench-qwen3")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(__import__("json").dumps(config_to_hf(config)))
        hf_config = transformers.AutoConfig.from_pretrained(tmp, attn_implementation="sdpa")
        torch.manual_seed(0)
        ref = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
        ref.save_pretrained(tmp)
        ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))
        mask = np.ones_like(ids)
        tokens = ids.size
        print(
            f"bench-qwen3 ({bidirlm_jax.param_count(config) / 1e6:.1f}M params), fp32, batch {args.batch} x seq {args.seq}, "
            f"{torch.get_num_threads()} torch threads"
        )
        print(f"{'attention':<15}{'jax tok/s':>12}{'torch tok/s':>13}{'ratio':>8}{'max |Δ| rel':>13}")
        for attention, kwargs in (("causal", {}), ("bidirectional", {"is_causal": False})):
            model = bidirlm_jax.from_pretrained(tmp, attention=attention)
            forward = nnx.jit(lambda m, i, a: m(i, a).logits)
            ours = forward(model, ids, mask)
            t_jax = _best_of(lambda f=forward, m=model: f(m, ids, mask).block_until_ready(), args.iters)
            with torch.no_grad():
                tid, tmask = torch.as_tensor(ids), torch.as_tensor(mask)
                theirs = ref(input_ids=tid, attention_mask=tmask, **kwargs).logits.numpy()
                t_torch = _best_of(
                    lambda r=ref, i=tid, a=tmask, kw=kwargs: r(input_ids=i, attention_mask=a, **kw), args.iters
                )
            err = float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())
            print(
                f"{attention:<15}{tokens / t_jax:>12,.0f}{tokens / t_torch:>13,.0f}{t_torch / t_jax:>7.2f}x{err:>13.1e}"
            )


if __name__ == "__main__":
    main()
