"""benchmarks/profile_step.py's attribution: interval arithmetic over trace events, and HLO instructions mapped to
model parts through the stack frames XLA records (checked on a real compiled program, so a misread of XLA's frame
tables shows up as projections no longer attributed to attention and MLP)."""

import importlib
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.transformer import Transformer

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
profile_step = importlib.import_module("profile_step")


def test_covered_counts_overlaps_once():
    assert profile_step.covered([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert profile_step.covered([]) == 0


def test_self_time_excludes_nested_events():
    own, top = profile_step._nest([(0, 10, "while"), (2, 5, "dot"), (6, 7, "dot"), (12, 14, "copy")])
    assert own == {"while": 6, "dot": 4, "copy": 2}
    assert top == {"while": 10, "copy": 2}


def test_first_matching_frame_decides():
    frames = [("/x/bidirlm_jax/models/layers.py", "linear"), ("/x/bidirlm_jax/models/layers.py", "MLP.__call__")]
    assert profile_step.part_of(frames) == "MLP"
    assert profile_step.part_of([("/x/optax/_src/transform.py", "update_fn")]) == "optimizer"
    assert profile_step.part_of([("/x/bidirlm_jax/kernels/cross_entropy.py", "_logits")]) == "head / pooling & loss"
    assert profile_step.part_of([("/x/numpy/foo.py", "f")]) == "other XLA ops"


def test_a_compiled_gradient_attributes_projections_to_attention_and_mlp():
    config = get_preset("tiny-qwen3").replace(intermediate_size=96)  # a width no attention shape has
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))

    def loss(params, ids):
        return jnp.mean(nnx.merge(graphdef, params).hidden_states(ids, None) ** 2)

    ids = jnp.ones((2, 16), jnp.int32)
    hlo = jax.jit(jax.grad(loss)).lower(params, ids).compile().as_text()
    parts = profile_step.instruction_parts(hlo)
    dots = {}
    for line in hlo.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) (?:dot|fusion)\(", line)
        if m and m.group(1) in parts and ("dot(" in line or "dot_general" in line):
            dots[m.group(1)] = (m.group(2), parts[m.group(1)])
    found = {part for _, part in dots.values()}
    assert {"attention", "MLP"} <= found, dots
    width = config.intermediate_size  # only the MLP's projections have its hidden width
    assert all(part == "MLP" for shape, part in dots.values() if re.search(rf"\b{width}\b", shape)), dots
    assert "embedding" in set(parts.values())
