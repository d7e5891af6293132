"""MNTP training step: ours (sparse, vocabulary-chunked LM head) vs the authors' PyTorch setup; the head's memory.

The peer is BidirLM's own recipe: transformers' `…ForCausalLM` run bidirectionally on the corrupted ids with
`labels` = the original token where masked, -100 elsewhere (transformers shifts the labels itself, so the logits at
i-1 score the masked token at i: our definition, `losses.mntp.next_token_targets`), dense logits, and
`torch.optim.AdamW`. Both sides start from the same weights (saved by transformers, loaded by us) and see the same
batch and masks (Bernoulli 30 % of every position but the first, drawn once in numpy); the step-0 losses must agree
before anything is timed. One step = forward, backward, global grad-norm clipping (1.0), AdamW (β 0.9/0.95, ε 1e-8,
weight decay 0.1 on matrices). Ours is the engine's jitted step (`make_step_fn` + `jit_step`, one CPU device) over
`token_sum_grads(mntp_loss_from_mask)`: sparse head with ⌈1.2 · 0.3 · T⌉ slots per row, and the dense head as a
second reference.

(a) `bench-qwen3` (41.6M parameters, vocab 32k), fp32, batch 4 x 512: ours (sparse head, and the dense head) vs
    torch eager (sdpa, `is_causal=False`), and `torch.compile` with `--torch-compile`. Target >= 1.3x torch eager.
(b) A Gemma3-270M-shaped model cut to 2 layers (hidden 640, vocab 262,144: the head is 94 % of the parameters),
    bidirectional (`use_bidirectional_attention`, sliding layers |i-j| <= 256), fp32, batch 2 x 512: step time
    (ours sparse, ours dense and torch eager interleaved in this process) and peak memory (each side alone in a fresh
    process, one step after a warm-up: VmHWM; for ours also XLA's compiled memory analysis).
(c) XLA's compiled memory of Gemma3-270M's MNTP step at seq 8192, batch 1, with the paper preset's model settings
    (`bidirlm_jax/configs/mntp.py`: bf16 compute, fp32 master weights, remat `full`, scanned layers; `--remat-c`/`--unrolled-c`
    change them), sparse chunked vs dense head vs no head at all (the
    encoder's floor), on abstract inputs (`jax.ShapeDtypeStruct`: nothing is allocated); `--gradient` adds the
    gradient alone (without the optimizer).

Timings: `--iters` interleaved rounds after a warm-up step (every variant sees the same machine load); best and
median reported, ratios from the best. The load average is printed with each round.

    .venv/bin/python benchmarks/mntp_step.py [--parts abc] [--iters 3] [--torch-compile] [--gradient]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from measure import Bench
from peers import GIB, OPTIM, constant_optimizer, memory_row, torch_adamw, vm

import bidirlm_jax
from bidirlm_jax.io.hf_config import config_to_hf
from bidirlm_jax.io.params import param_count
from bidirlm_jax.losses.mntp import capacity, mntp_loss_from_mask
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.train.objectives import token_sum_grads
from bidirlm_jax.train.state import StateLayout
from bidirlm_jax.train.step import jit_step, make_step_fn

RATIO, CAPACITY_FACTOR = 0.3, 1.2
MASK_ID = 4  # any id works for random weights (Gemma3's <mask> is 4)
BIDIRECTIONAL = dict(attention="bidirectional", bidirectional_window="half")


def gemma_small():
    """Gemma3-270M with its first 2 layers (both sliding): the 262,144-word head dominates."""
    base = get_preset("gemma3-270m")
    return base.replace(num_layers=2, layer_types=base.layer_types[:2])


MODELS = {"bench-qwen3": lambda: get_preset("bench-qwen3"), "gemma3-2l": gemma_small}


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids, Bernoulli(0.3) masks over every position but the first (it has nothing to predict it)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, (batch, seq)).astype(np.int32)
    masked = rng.random((batch, seq)) < RATIO
    masked[:, 0] = False
    return {"input_ids": ids, "corrupted": np.where(masked, MASK_ID, ids).astype(np.int32), "masked": masked}


def save_reference(name: str, path: Path) -> None:
    """Random weights (torch seed 0) written by transformers: both sides load these."""
    runtime = Runtime(**BIDIRECTIONAL) if name.startswith("gemma") else Runtime()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(MODELS[name](), runtime)))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    model.save_pretrained(path)


# --- ours ----------------------------------------------------------------------------------------------------


def _loss(seq: int, sparse: bool, chunk_size: int):
    slots = capacity(seq, RATIO, CAPACITY_FACTOR) if sparse else None

    def loss_fn(model, batch, rng):
        del rng  # explicit masks, the same as torch's
        return mntp_loss_from_mask(
            model, batch, batch["corrupted"], batch["masked"], slots=slots, chunk_size=chunk_size
        )

    return loss_fn


def jax_step(path: Path, batch: dict, *, sparse: bool, chunk_size: int):
    """(one-step callable, step-0 metrics, compiled memory analysis, compile seconds) of the engine's step."""
    model = bidirlm_jax.from_pretrained(path, **BIDIRECTIONAL)
    config = model.config
    tx, schedule = constant_optimizer()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = StateLayout(config, tx, mesh, seed=0, runtime=model.runtime)
    state = layout.from_params(nnx.state(model, nnx.Param))
    del model
    grad_fn = token_sum_grads(_loss(batch["input_ids"].shape[1], sparse, chunk_size))
    step = jit_step(make_step_fn(layout.graphdef, grad_fn, tx, schedule), layout.shardings, mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    holder = {}
    with jax.set_mesh(mesh):
        holder["state"], out = compiled(state, batch)
    out = {k: float(v) for k, v in out.items()}

    def run():
        with jax.set_mesh(mesh):
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics)

    return run, out, compiled.memory_analysis(), seconds


# --- torch ---------------------------------------------------------------------------------------------------


def torch_step(path: Path, batch: dict, mode: str = "eager"):
    """(one-step callable, step-0 loss, seconds of the first two calls) of transformers + AdamW: dense logits,
    `labels` = original token where masked, transformers shifting them once."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").train()
    kwargs = {"is_causal": False} if model.config.model_type == "qwen3" else {}  # Gemma3: from its config
    opt = torch_adamw(model.parameters())
    forward = torch.compile(model) if mode == "compile" else model
    inputs = torch.as_tensor(batch["corrupted"], dtype=torch.long)
    labels = torch.as_tensor(np.where(batch["masked"], batch["input_ids"], -100), dtype=torch.long)

    def run() -> float:
        loss = forward(input_ids=inputs, labels=labels, **kwargs).loss  # mean CE over masked targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    start = time.perf_counter()
    loss = run()
    run()  # torch.compile may recompile on the second call
    return run, loss, time.perf_counter() - start


# --- timing --------------------------------------------------------------------------------------------------


def check_losses(ours: dict, theirs: dict[str, float]) -> None:
    assert ours["mntp_overflow"] == 0, f"sparse head dropped {ours['mntp_overflow']} targets; raise the capacity"
    for name, loss in theirs.items():
        rel = abs(ours["loss"] - loss) / abs(loss)
        print(f"  step-0 loss: ours {ours['loss']:.6f}, {name} {loss:.6f} (relative difference {rel:.1e})")
        assert rel < 1e-4, f"step-0 losses differ: ours {ours['loss']} vs {name} {loss}"


def part_a(tmp: Path, args, bench: Bench) -> dict:
    name = "bench-qwen3"
    config = MODELS[name]()
    print(
        f"\n(a) {name} ({param_count(config) / 1e6:.1f}M params), fp32, batch {args.batch} x {args.seq}, bidirectional"
    )
    save_reference(name, tmp / name)
    batch = make_batch(config.vocab_size, args.batch, args.seq)
    print(f"  masked targets: {int(batch['masked'].sum())}, slots {capacity(args.seq, RATIO, CAPACITY_FACTOR)}/row")
    variants, first, extra = {}, {}, {}
    for label, sparse in (("ours sparse", True), ("ours dense", False)):
        run, out, ma, seconds = jax_step(tmp / name, batch, sparse=sparse, chunk_size=args.chunk_size)
        variants[label], first[label] = run, out
        extra[label] = dict(compile_seconds=seconds, **memory_row(ma))
    theirs = {}
    for mode in ("eager",) + (("compile",) if args.torch_compile else ()):
        run, loss, seconds = torch_step(tmp / name, batch, mode)
        variants[f"torch {mode}"], theirs[f"torch {mode}"] = run, loss
        extra[f"torch {mode}"] = dict(first_two_calls_seconds=seconds)
    check_losses(first["ours sparse"], theirs)
    check_losses(first["ours dense"], {"torch eager": theirs["torch eager"]})
    rows = bench.rounds(variants, args.iters)
    for n, r in rows.items():
        r.update(extra[n])
    tokens = args.batch * args.seq
    print(f"  {'step':<15}{'best s':>9}{'median s':>10}{'tok/s':>9}{'CPU s best':>12}{'CPU s median':>14}")
    for n, r in rows.items():
        print(
            f"  {n:<15}{r['best']:>9.3f}{r['median']:>10.3f}{tokens / r['best']:>9,.0f}"
            f"{r['cpu_best']:>12.2f}{r['cpu_median']:>14.2f}"
        )
    ratios = {f"{n} / ours sparse": bench.show_ratio("ours sparse", n) for n in rows if n != "ours sparse"}
    return dict(rows=rows, ratios=ratios, loss=theirs["torch eager"], targets=int(batch["masked"].sum()))


def worker(side: str, path: str, batch_file: str, iters: int, chunk_size: int) -> None:
    """One side alone in a fresh process: peak RSS (VmHWM) over setup and warm-up, and over the timed steps alone
    (the high-water mark is reset once the state is complete: every optimizer moment exists after the warm-up)."""
    batch = dict(np.load(batch_file))
    rss0 = vm("VmRSS")
    if side == "torch":
        run, loss, _ = torch_step(Path(path), batch)
        out, ma = {"loss": loss}, None
    else:
        run, out, ma, _ = jax_step(Path(path), batch, sparse=side == "ours sparse", chunk_size=chunk_size)
        run()
    result = dict(loss=out["loss"], rss_start=rss0, hwm_setup=vm("VmHWM"), rss_ready=vm("VmRSS"))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    result.update(times=times, hwm=vm("VmHWM"))
    if ma is not None:
        result.update(memory_row(ma))
    print("RESULT " + json.dumps(result))


def part_b(tmp: Path, args, bench: Bench) -> dict:
    name = "gemma3-2l"
    config = MODELS[name]()
    head = config.vocab_size * config.hidden_size
    print(
        f"\n(b) Gemma3-270M shape, {config.num_layers} layers ({param_count(config) / 1e6:.1f}M params, head "
        f"{head / 1e6:.1f}M), fp32, batch {args.batch_b} x {args.seq}, bidirectional (sliding |i-j| <= 256)"
    )
    save_reference(name, tmp / name)
    batch = make_batch(config.vocab_size, args.batch_b, args.seq, seed=1)
    batch_file = tmp / "batch_b.npz"
    np.savez(batch_file, **batch)
    # Peak memory: each side alone in a fresh process.
    memory = {}
    for side in ("ours sparse", "ours dense", "torch"):
        command = [
            sys.executable,
            __file__,
            "--worker",
            side,
            "--path",
            str(tmp / name),
            "--batch-file",
            str(batch_file),
        ]
        command += ["--iters", "1", "--chunk-size", str(args.chunk_size)]
        proc = subprocess.run(command, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"  {side} worker failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
            continue
        memory[side] = json.loads(line[-1][7:])
        m = memory[side]
        print(
            f"  {side:<12} alone: peak RSS over the steps {m['hwm'] / GIB:.2f} GiB (ready {m['rss_ready'] / GIB:.2f}, "
            f"after imports {m['rss_start'] / GIB:.2f}, peak incl. setup {m['hwm_setup'] / GIB:.2f}), steps "
            + ", ".join(f"{t:.2f}" for t in m["times"])
            + " s"
            + (f", XLA temp {m['temp_gib']:.2f} GiB" if "temp_gib" in m else "")
        )
    if args.skip_b_timing:
        return dict(memory=memory)
    # Step time: interleaved in this process.
    variants, first = {}, {}
    for label, sparse in (("ours sparse", True), ("ours dense", False)):
        run, first[label], _, _ = jax_step(tmp / name, batch, sparse=sparse, chunk_size=args.chunk_size)
        variants[label] = run
    run, loss, _ = torch_step(tmp / name, batch)
    variants["torch eager"] = run
    check_losses(first["ours sparse"], {"torch eager": loss})
    check_losses(first["ours dense"], {"torch eager": loss})
    rows = bench.rounds(variants, args.iters)
    for n, r in rows.items():
        m = memory.get("torch" if n == "torch eager" else n)
        if m is not None:
            r.update(
                peak_rss_gib=m["hwm"] / GIB,
                rss_ready_gib=m["rss_ready"] / GIB,
                rss_after_imports_gib=m["rss_start"] / GIB,
                peak_rss_with_setup_gib=m["hwm_setup"] / GIB,
            )
            r.update({k: v for k, v in m.items() if k.endswith("_gib")})
    ratios = {f"{n} / ours sparse": bench.show_ratio("ours sparse", n) for n in rows if n != "ours sparse"}
    print(f"  {'step':<15}{'best s':>9}{'median s':>10}{'peak RSS GiB':>14}{'step peak - ready GiB':>23}")
    for n, r in rows.items():
        extra = r.get("peak_rss_gib", float("nan")) - r.get("rss_ready_gib", float("nan"))
        print(
            f"  {n:<15}{r['best']:>9.2f}{r['median']:>10.2f}{r.get('peak_rss_gib', float('nan')):>14.2f}{extra:>23.2f}"
        )
    return dict(rows=rows, ratios=ratios, loss=loss, state_gib_per_side=16 * param_count(config) / GIB)


def part_c(args) -> dict:
    from bidirlm_jax.configs.mntp import get_config

    paper = get_config("gemma3-270m").model  # the paper preset's model settings
    remat = args.remat_c or paper.remat
    scan = paper.scan_layers and not args.unrolled_c
    print(
        f"\n(c) Gemma3-270M (18 layers), seq 8192 x batch 1, {paper.dtype} compute, fp32 master weights, remat {remat}, "
        f"{'scanned' if scan else 'unrolled'} layers; XLA memory analysis on abstract inputs"
    )
    config = get_preset("gemma3-270m")
    runtime = Runtime(dtype=paper.dtype, remat=remat, scan_layers=scan, **BIDIRECTIONAL)
    logging.basicConfig(format="  %(message)s")  # which attention kernel "auto" takes at this length
    logging.getLogger("bidirlm_jax.kernels.attention").setLevel(logging.INFO)
    tx, schedule = constant_optimizer()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = StateLayout(config, tx, mesh, seed=0, runtime=runtime)
    seq = 8192
    batch = {
        "input_ids": jax.ShapeDtypeStruct((1, seq), jnp.int32),
        "corrupted": jax.ShapeDtypeStruct((1, seq), jnp.int32),
        "masked": jax.ShapeDtypeStruct((1, seq), jnp.bool_),
    }

    def no_head(model, batch, rng):  # the floor: the same encoder and optimizer, no LM head at all
        hidden = model.hidden_states(batch["corrupted"], None)
        return 1e-3 * jnp.sum(hidden.astype(jnp.float32)), jnp.sum(batch["masked"], dtype=jnp.float32), {}

    rows = {}
    losses = {
        "sparse chunked": _loss(seq, True, args.chunk_size_c),
        "dense": _loss(seq, False, args.chunk_size_c),
        "encoder, no head": no_head,
    }
    for label, loss_fn in losses.items():
        grad_fn = token_sum_grads(loss_fn)
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            g = None
            if args.gradient:
                grad = jax.jit(grad_fn, static_argnums=0).lower(
                    layout.graphdef, layout.abstract.params, batch, jax.ShapeDtypeStruct((2,), jnp.uint32)
                )
                g = memory_row(grad.compile().memory_analysis())
            step = jit_step(make_step_fn(layout.graphdef, grad_fn, tx, schedule), layout.shardings, mesh)
            s = memory_row(step.lower(layout.abstract, batch).compile().memory_analysis())
        rows[label] = dict(gradient=g, step=s, seconds=time.perf_counter() - start)
        print(
            f"  {label:<17}"
            + (f" gradient temp {g['temp_gib']:6.2f} GiB;" if g else "")
            + f" step temp {s['temp_gib']:6.2f} GiB "
            f"(arguments {s['argument_gib']:.2f}, outputs {s['output_gib']:.2f}, aliased {s['alias_gib']:.2f}); "
            f"lowered+compiled in {rows[label]['seconds']:.0f} s"
        )
    logits = seq * config.vocab_size
    print(f"  (one [8192, 262144] logits array: {2 * logits / GIB:.1f} GiB bf16, {4 * logits / GIB:.1f} GiB fp32)")
    return dict(rows=rows, remat=remat, scan_layers=scan, dtype=paper.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="abc")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch-b", type=int, default=2, help="rows in (b): torch's dense [rows·seq, 262144] logits")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument(
        "--chunk-size", type=int, default=16384, help="vocabulary chunk of the sparse head (the preset's), (a)/(b)"
    )
    parser.add_argument("--chunk-size-c", type=int, default=16384, help="vocabulary chunk in (c) (the preset's)")
    parser.add_argument("--remat-c", default="", help="(c): remat policy instead of the paper preset's")
    parser.add_argument("--unrolled-c", action="store_true", help="(c): unrolled layers instead of the preset's scan")
    parser.add_argument("--skip-b-timing", action="store_true", help="(b): only the peak-memory runs")
    parser.add_argument("--torch-compile", action="store_true", help="(a): also torch.compile (minutes to compile)")
    parser.add_argument("--gradient", action="store_true", help="(c): also the gradient alone, without the optimizer")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "mntp_step.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=0, help="pin the process to its first N allowed cores (0: all)")
    args = parser.parse_args()
    if args.cores:  # every thread of this process (any already started too) and every later one
        cores = sorted(os.sched_getaffinity(0))[: args.cores]
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), cores)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if args.worker:
        return worker(args.worker, args.path, args.batch_file, args.iters, args.chunk_size)
    bench = Bench(threads={"torch": torch.get_num_threads()})
    print(f"jax {jax.__version__}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "a" in args.parts:
            results["a"] = part_a(Path(tmp), args, bench)
        if "b" in args.parts:
            results["b"] = part_b(Path(tmp), args, bench)
    if "c" in args.parts:
        results["c"] = part_c(args)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    bench.finish(out, {**previous, **results})


if __name__ == "__main__":
    main()
