"""Where the time of one MNTP and one contrastive (GradCache) step goes on CPU, beside the matmul roofline.

Both steps are the engine's own (`make_step_fn` + `jit_step`, one CPU device, random `bench-qwen3` weights, fp32):
MNTP with the sparse head (as `mntp_step.py`), contrastive with GradCache chunks (as `contrastive_step.py`). Each
is compiled, run once, then traced by XLA's profiler (`jax.profiler`) over `--iters` steps. Every executed XLA op
(thunk) is attributed by its self time (wall time inside it minus the ops nested in it, summed over XLA's threads;
thread-pool waits left out) to the model part its HLO instruction comes from: the innermost frame of the Python
stack XLA records for it that names a part (forward and backward alike): embedding, attention (projections, RoPE,
the kernel), MLP, norms & residuals, head / pooling & loss, optimizer (clipping + AdamW), other XLA ops. Host work
is the step's wall time during which no XLA op ran on any thread (Python, dispatch, transfers, the profiler's own
overhead included, so an upper bound). Matmul FLOP/s of the step (XLA's cost analysis over the
step time) are shown against a 2048^3 fp32 matmul measured in the same run (jax's, and torch's beside it: the peers'
kernel); the cost analysis counts a loop's body
once, so for a step with loops (GradCache's chunks, the chunked LM head) it is a lower bound.

    .venv/bin/python benchmarks/profile_step.py [--iters 2]   (quick: --quick: 2 layers, small batches)
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from contrastive_step import _grad_fn as contrastive_grad_fn
from contrastive_step import make_batch as contrastive_batch
from measure import Bench, cpu_seconds
from mntp_step import _loss as mntp_loss
from mntp_step import make_batch as mntp_batch
from peers import constant_optimizer

from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.train.objectives import token_sum_grads
from bidirlm_jax.train.state import StateLayout
from bidirlm_jax.train.step import jit_step, make_step_fn

PARTS = ("embedding", "attention", "MLP", "norms & residuals", "head / pooling & loss", "optimizer", "other XLA ops")
WAITS = ("SlinkyThreadPool::Await", "ThunkExecutor::Execute")  # waiting / the executor's own span, not an op


RULES = (  # (file part, function prefix or "", part): the innermost frame that matches decides
    ("kernels/cross_entropy.py", "", "head / pooling & loss"),
    ("/kernels/", "", "attention"),
    ("models/positions.py", "", "attention"),
    ("models/attention.py", "", "attention"),
    ("models/layers.py", "Embedder", "embedding"),
    ("models/transformer.py", "Transformer.embed", "embedding"),
    ("models/layers.py", "MLP", "MLP"),
    ("models/layers.py", "RMSNorm", "norms & residuals"),
    ("models/transformer.py", "Transformer.logits", "head / pooling & loss"),
    ("models/transformer.py", "Transformer.lm_head", "head / pooling & loss"),
    ("models/transformer.py", "", "norms & residuals"),
    ("models/pooling.py", "", "head / pooling & loss"),
    ("/losses/", "", "head / pooling & loss"),
    ("train/gradcache.py", "", "head / pooling & loss"),
    ("optax/", "", "optimizer"),
    ("train/step.py", "make_step_fn", "optimizer"),  # clipping and the update: outside the loss's frames
)


def part_of(frames: list[tuple[str, str]]) -> str:
    """The model part of one HLO instruction from its Python stack (innermost frame first): backward ops carry
    the frames of the forward code they differentiate."""
    for path, function in frames:
        for file_part, prefix, part in RULES:
            if file_part in path and function.startswith(prefix):
                return part
    return "other XLA ops"


INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*stack_frame_id=(\d+)")
ENTRY = re.compile(r"^(\d+) (.*)$")
TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def _field(text: str, key: str) -> int:
    return int(re.search(rf"{key}=(\d+)", text).group(1))


def instruction_parts(hlo: str) -> dict[str, str]:
    """HLO instruction name -> model part, from the optimised module's stack-frame tables."""
    tables: dict[str, dict[int, str]] = {name: {} for name in TABLES}
    current = None
    for line in hlo.splitlines():
        if line in TABLES:
            current = tables[line]
        elif current is not None and (m := ENTRY.match(line)):
            current[int(m.group(1))] = m.group(2).strip('"')
        else:
            current = None
    files, functions, locations, frames = (tables[name] for name in TABLES)

    def stack(frame: int) -> list[tuple[str, str]]:
        out, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            loc = locations[_field(frames[frame], "file_location_id")]
            out.append((files[_field(loc, "file_name_id")], functions[_field(loc, "function_name_id")]))
            frame = _field(frames[frame], "parent_frame_id") - 1  # printed one above its key (0: no parent)
        return out

    return {m.group(1): part_of(stack(int(m.group(2)))) for line in hlo.splitlines() if (m := INSTRUCTION.match(line))}


def _nest(events: list[tuple[int, int, str]]) -> tuple[collections.Counter, collections.Counter]:
    """(self time, top-level time) in ns of every event name on one thread: self = its duration minus the events
    nested inside it; top-level = events inside no other."""
    own, top = collections.Counter(), collections.Counter()
    stack: list[list] = []  # [end, name, self time]
    for start, end, name in sorted(events, key=lambda e: (e[0], -e[1])):
        while stack and stack[-1][0] <= start:
            done = stack.pop()
            own[done[1]] += done[2]
        if stack:
            stack[-1][2] -= min(end, stack[-1][0]) - start
        else:
            top[name] += end - start
        stack.append([end, name, end - start])
    for done in stack:
        own[done[1]] += done[2]
    return own, top


def covered(intervals: list[tuple[int, int]]) -> int:
    """ns covered by the union of [start, end) intervals."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


def trace_times(trace_dir: str) -> tuple[collections.Counter, float]:
    """Self time (ns) of every XLA op over the trace (all of XLA's threads), and the ns during which XLA ran
    anything at all on any thread (the rest of the wall time is host work: Python, dispatch, transfers)."""
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[-1])
    ops, busy = collections.Counter(), []
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            events = [(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events]
            ops.update(_nest(events)[0])
            busy += [(start, end) for start, end, _ in events]
    return ops, covered(busy)


def roofline(bench: Bench, n: int = 2048) -> dict[str, float]:
    """fp32 FLOP/s of an n^3 matmul, best of 3 interleaved rounds in this run: jax's (XLA's CPU dot, the roofline of
    our steps) and torch's (the peers' kernel), so a step's ratio to its peer can be read against the kernels'."""
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a = jnp.asarray(x)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    sides = {"jax": lambda: f(a).block_until_ready()}
    try:
        import torch

        t = torch.from_numpy(x)
        sides["torch"] = lambda: t @ t
    except ImportError:  # the peers' extra is not installed: our roofline alone
        pass
    rows = bench.rounds({f"matmul {n}^3 fp32, {k}": run for k, run in sides.items()}, 3)
    return {k: 2 * n**3 / rows[f"matmul {n}^3 fp32, {k}"]["best"] for k in sides}


def profile(name: str, config, grad_fn, batch: dict, iters: int, roof: float, bench: Bench) -> dict:
    tx, schedule = constant_optimizer()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = StateLayout(config, tx, mesh, seed=0, runtime=Runtime(attention="bidirectional"))
    step = jit_step(make_step_fn(layout.graphdef, grad_fn, tx, schedule), layout.shardings, mesh)
    with jax.set_mesh(mesh):
        compiled = step.lower(layout.abstract, batch).compile()
        holder = {"state": layout.init()}

        def run():
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics)

        run()  # warm-up
        timed = bench.rounds({name: run}, iters)[name]
        with tempfile.TemporaryDirectory() as trace:
            cpu0, start = cpu_seconds(), time.perf_counter()
            jax.profiler.start_trace(trace)
            for _ in range(iters):
                run()
            jax.profiler.stop_trace()
            traced_wall, traced_cpu = time.perf_counter() - start, cpu_seconds() - cpu0
            ops, busy = trace_times(trace)
    parts = instruction_parts(compiled.as_text())
    seconds = collections.Counter()
    for op, ns in ops.items():
        if op not in WAITS and not op.startswith("ThunkExecutor"):
            seconds[parts.get(op, "other XLA ops")] += ns / 1e9 / iters
    in_ops = sum(seconds.values())
    host = max(traced_wall - busy / 1e9, 0.0) / iters
    flops = compiled.cost_analysis()["flops"]
    print(
        f"\n{name}: step {timed['best']:.2f} s best, {timed['median']:.2f} s median (traced {traced_wall / iters:.2f} s, "
        f"{traced_cpu / iters:.2f} CPU s per step); {flops / 1e9:.1f} GFLOP (XLA cost analysis, loop bodies once) = "
        f"{flops / timed['best'] / 1e9:.0f} GFLOP/s, {100 * flops / timed['best'] / roof:.0f}% of the matmul roofline"
    )
    print(f"  {'part':<24}{'s/step in its ops':>18}{'share':>8}")
    for part in PARTS:
        print(f"  {part:<24}{seconds.get(part, 0.0):>18.3f}{100 * seconds.get(part, 0.0) / in_ops:>7.0f}%")
    print(f"  {'(all XLA ops)':<24}{in_ops:>18.3f}")
    print(
        f"  host work: {host:.3f} s/step with no XLA op running on any thread "
        f"({100 * host * iters / traced_wall:.0f}% of the traced wall time)"
    )
    return dict(
        step=timed,
        flops=flops,
        op_seconds_per_step=dict(seconds),
        host_seconds_per_step=host,
        traced_wall_per_step=traced_wall / iters,
        traced_cpu_per_step=traced_cpu / iters,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2, help="timed rounds, then traced steps")
    parser.add_argument("--quick", action="store_true", help="2 layers, batch 1 x 128 (MNTP), 4 x (1+1) x 64")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "profile_step.json"))
    args = parser.parse_args()
    bench = Bench()
    config = get_preset("bench-qwen3")
    layers = 2 if args.quick else config.num_layers
    config = config.replace(num_layers=layers, layer_types=config.layer_types[:layers])
    rates = roofline(bench)
    roof = rates["jax"]
    print("matmul 2048^3 fp32 (best of 3): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
    mb, ms = (1, 128) if args.quick else (4, 512)
    cb, cl, chunk = (4, 64, 4) if args.quick else (32, 128, 8)
    results = {"roofline_flops": roof, "matmul_flops": rates}
    results["mntp"] = profile(
        f"MNTP step, bench-qwen3 {layers} layers, batch {mb} x {ms}, sparse head",
        config,
        token_sum_grads(mntp_loss(ms, True, 16384)),
        mntp_batch(config.vocab_size, mb, ms),
        args.iters,
        roof,
        bench,
    )
    results["contrastive"] = profile(
        f"contrastive step, bench-qwen3 {layers} layers, {cb} x (1 + 1 + 1) texts of {cl}, GradCache chunks {chunk}",
        config,
        contrastive_grad_fn(chunk),
        contrastive_batch(config.vocab_size, cb, 1, cl),
        args.iters,
        roof,
        bench,
    )
    bench.finish(args.out, results)


if __name__ == "__main__":
    main()
