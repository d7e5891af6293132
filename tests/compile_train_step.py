"""Compile a paper preset's train step on fake CPU devices (a test helper run as a subprocess, so that the
test can read what XLA's C++ logs to stderr).

    python tests/compile_train_step.py WORKDIR CONFIG:PRESET[@DATA,FSDP,TENSOR] ...

Each preset is cut to a two-layer model of the same family (its sharding rules and axis names unchanged)
and the built-in text, then planned by the engine (`train.loop`) on the mesh the preset asks for (what the
launcher would use on this device count) or the one given, and its step lowered and compiled. The
persistent compilation cache is off: a cache hit skips the SPMD partitioner and with it the log lines.
"""

import sys
from pathlib import Path

import jax

from bidirlm_jax.configs import contrastive, mntp
from bidirlm_jax.evals.registry import EVALUATORS
from bidirlm_jax.train import loop

CONFIGS = {"mntp": mntp, "contrastive": contrastive}
# The SPMD partitioner (which logs an involuntary rematerialization) runs among the HLO passes, before
# code generation: unoptimised CPU code generation leaves the partitioning as it is, and compiles faster.
FAST_CODEGEN = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SMALL = dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16)


def compile_step(spec: str, workdir: Path) -> None:
    spec, _, mesh = spec.partition("@")
    name, _, preset = spec.partition(":")
    config = CONFIGS[name].get_config(preset)
    config.model.update(**SMALL)
    config.train.steps = 2
    if name == "mntp":  # three micro-batches of one row per device, as the preset splits its batch
        config.data.update(source="stdlib", seq_len=64, global_batch_size=24)
        config.train.max_rows_per_device = 1
    else:
        config.data.update(source="stdlib", seq_len=32, global_batch_size=16)
        config.contrastive.update(chunk_size=2, num_negatives=1)
    if mesh:
        config.mesh.update(dict(zip(("data", "fsdp", "tensor"), map(int, mesh.split(",")))))
    plan = loop._plan(config, workdir / spec.replace(":", "-"), None, EVALUATORS)
    with jax.set_mesh(plan.mesh):
        plan.step_fn.lower(plan.layout.abstract, plan.batches.shapes).compile(compiler_options=FAST_CODEGEN)
    print(f"compiled {spec} on {dict(plan.mesh.shape)}", flush=True)


if __name__ == "__main__":
    jax.config.update("jax_enable_compilation_cache", False)
    for arg in sys.argv[2:]:
        compile_step(arg, Path(sys.argv[1]))
