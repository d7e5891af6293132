"""Training-step throughput on this machine: our jitted step vs transformers + torch, same loss and optimizer.

One step = forward, backward, global grad-norm clipping (1.0) and AdamW, on the project's benchmark
model (preset `bench-qwen3`: Qwen3-shaped, hidden 512, 8 layers, vocab 32k, tied, 41.6M parameters),
batch 4 x seq 512, next-token cross-entropy. Compared in the same run: torch eager (sdpa),
`torch.compile`, and bf16 (our bf16 compute with fp32 master weights vs torch's bf16 autocast). MFU is
model FLOPs (`bidirlm_jax.train.metrics.training_flops_per_token`) per second over jax's own fp32 (or
bf16) matmul throughput measured here. Targets: >= 1.5x torch eager, >= 1.2x torch.compile, MFU >= 50%.

    .venv/bin/python benchmarks/train_step.py [--batch 4 --seq 512 --iters 5] [--skip-compile]
    (quick: --batch 1 --seq 128 --iters 2 --skip-compile)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from measure import Bench
from peers import OPTIM, constant_optimizer, torch_adamw

from bidirlm_jax.io.hf_config import config_to_hf
from bidirlm_jax.io.params import param_count
from bidirlm_jax.losses.causal_lm import causal_lm_loss
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.train.metrics import training_flops_per_token
from bidirlm_jax.train.objectives import token_sum_grads
from bidirlm_jax.train.state import StateLayout
from bidirlm_jax.train.step import jit_step, make_step_fn


def matmul(dtype, n: int = 2048):
    """jax's own n×n×n matmul: its FLOP/s on this machine is the ceiling our step's matmuls can reach."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return lambda: f(a).block_until_ready()


def jax_step(dtype: str, ids: np.ndarray):
    """(one-step callable, first-step loss) of the engine's jitted step on one device."""
    config = get_preset("bench-qwen3")
    tx, schedule = constant_optimizer()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = StateLayout(config, tx, mesh, seed=0, runtime=Runtime(dtype=dtype))
    batch = {"input_ids": ids.astype(np.int32)}
    step = jit_step(
        make_step_fn(layout.graphdef, token_sum_grads(causal_lm_loss), tx, schedule), layout.shardings, mesh
    )
    holder = {}
    with jax.set_mesh(mesh):
        holder["state"], out = step(layout.init(), batch)

    def run():
        with jax.set_mesh(mesh):
            holder["state"], metrics = step(holder["state"], batch)
            jax.block_until_ready(metrics)

    return run, float(out["loss"])


def torch_step(mode: str, ids: np.ndarray):
    """(one-step callable, first-step loss) of transformers' Qwen3 (sdpa) + torch AdamW, in `mode`:
    eager, compile (torch.compile of the model) or bf16 (eager under bf16 autocast)."""
    config = get_preset("bench-qwen3")
    hf = transformers.Qwen3Config(**{k: v for k, v in config_to_hf(config).items() if k != "architectures"})
    hf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(hf).train()
    opt = torch_adamw(model.parameters())
    forward = torch.compile(model) if mode == "compile" else model
    tids = torch.as_tensor(ids, dtype=torch.long)

    def run() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = forward(input_ids=tids, labels=tids).loss  # mean next-token CE, as causal_lm_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    loss = run()
    run()  # torch.compile may recompile on the second call
    return run, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (slow to compile)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "train_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    bench = Bench(threads={"torch": torch.get_num_threads()})
    config = get_preset("bench-qwen3")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))
    tokens = ids.size
    flops = training_flops_per_token(config, args.seq, runtime=Runtime()) * tokens  # causal LM
    variants = {"matmul fp32": (matmul(jnp.float32), None), "matmul bf16": (matmul(jnp.bfloat16), None)}
    for name, dtype in (("jax fp32", "float32"), ("jax bf16", "bfloat16")):
        variants[name] = jax_step(dtype, ids)
    for mode in ("eager", "bf16") + (() if args.skip_compile else ("compile",)):
        variants[f"torch {mode}"] = torch_step(mode, ids)
    # Interleaved rounds: every variant sees the same machine load; the median of each is reported.
    timed = bench.rounds({name: run for name, (run, _) in variants.items()}, args.iters)
    median = {name: row["median"] for name, row in timed.items()}
    roof = {"float32": 2 * 2048**3 / median.pop("matmul fp32"), "bfloat16": 2 * 2048**3 / median.pop("matmul bf16")}
    print(
        f"bench-qwen3 ({param_count(config) / 1e6:.1f}M params), batch {args.batch} x seq {args.seq}, "
        f"{os.cpu_count()} cores, {flops / 1e9:.0f} GFLOP per step; jax matmul roofline "
        f"fp32 {roof['float32'] / 1e9:.0f} GFLOP/s, bf16 {roof['bfloat16'] / 1e9:.0f} GFLOP/s"
    )
    rows = {name: dict(seconds=seconds, loss=variants[name][1]) for name, seconds in median.items()}
    for name, dtype in (("jax fp32", "float32"), ("jax bf16", "bfloat16")):
        rows[name]["mfu"] = flops / rows[name]["seconds"] / roof[dtype]
    print(f"{'step':<15}{'s/step':>9}{'tok/s':>9}{'first loss':>12}{'MFU':>7}")
    for name, r in rows.items():
        r["tokens_per_second"] = tokens / r["seconds"]
        mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else ""
        print(f"{name:<15}{r['seconds']:>9.3f}{r['tokens_per_second']:>9,.0f}{r['loss']:>12.4f}{mfu:>7}")
    for m in ("eager", "compile"):
        if "torch " + m in rows:
            bench.show_ratio("jax fp32", "torch " + m)
    bench.show_ratio("jax bf16", "torch bf16")
    bench.finish(args.out, dict(steps=rows, roofline=roof, batch=args.batch, seq=args.seq, flops_per_step=flops))


if __name__ == "__main__":
    main()
