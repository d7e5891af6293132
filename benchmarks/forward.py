"""Forward-pass throughput on this machine: our jitted model vs transformers + torch (sdpa), same weights.

The benchmark model of the project (preset `bench-qwen3`: Qwen3-shaped, hidden 512, 8 layers, vocab
32k, tied, 41.6M parameters), fp32, batch 8 x seq 512, both attention modes. Target: >= 1.5x torch.

    .venv/bin/python benchmarks/forward.py [--batch 8 --seq 512 --iters 5]   (quick: --batch 2 --seq 128 --iters 2)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from flax import nnx
from measure import Bench

import bidirlm_jax
from bidirlm_jax.io.hf_config import config_to_hf
from bidirlm_jax.models.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--iters", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "forward.json"))
    args = parser.parse_args()
    bench = Bench(threads={"torch": torch.get_num_threads()})
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
        tid, tmask = torch.as_tensor(ids), torch.as_tensor(mask)
        results = {}
        for attention, kwargs in (("causal", {}), ("bidirectional", {"is_causal": False})):
            model = bidirlm_jax.from_pretrained(tmp, attention=attention)
            forward = nnx.jit(lambda m, i, a: m(i, a).logits)
            ours = np.asarray(forward(model, ids, mask))  # compiles

            def theirs(r=ref, kw=kwargs):
                with torch.no_grad():
                    return r(input_ids=tid, attention_mask=tmask, **kw).logits

            expected = theirs().numpy()  # warm-up
            err = float(np.abs(ours - expected).max() / np.abs(expected).max())
            print(f"{attention}: max |Δ| relative {err:.1e}")
            names = (f"ours {attention}", f"torch {attention}")
            bench.rounds(
                {names[0]: lambda f=forward, m=model: f(m, ids, mask).block_until_ready(), names[1]: theirs}, args.iters
            )
            results[attention] = dict(max_rel_diff=err, ratio=bench.show_ratio(*names))
        print(f"{'side':<24}{'best tok/s':>12}{'median tok/s':>14}")
        for name, row in bench.rows.items():
            print(f"{name:<24}{tokens / row['best']:>12,.0f}{tokens / row['median']:>14,.0f}")
    bench.finish(args.out, dict(attention=results, tokens=tokens))


if __name__ == "__main__":
    main()
