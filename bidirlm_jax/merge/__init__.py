"""Linear weight merging, θ = Σ wᵢθᵢ / Σ wᵢ: in memory on JAX pytrees, or streamed between checkpoint directories.

One concept per module: `linear` (the float32 kernel and `linear_merge` / `interpolate` on pytrees),
`spec` (the recipe, `MergeSpec`, and its mergekit YAML form), `plan` (opening the inputs, matching
their tensors, every check made before writing), `stream` (`merge_checkpoints`, the streaming engine),
and `mergekit_linear` (mergekit's arithmetic replayed bit for bit, on request).
"""

from bidirlm_jax.merge.linear import interpolate, linear_merge
from bidirlm_jax.merge.spec import MergeModel, MergeSpec, load_merge_yaml, spec_from_args
from bidirlm_jax.merge.stream import MergeResult, merge_checkpoints

__all__ = [
    "MergeModel",
    "MergeResult",
    "MergeSpec",
    "interpolate",
    "linear_merge",
    "load_merge_yaml",
    "merge_checkpoints",
    "spec_from_args",
]
