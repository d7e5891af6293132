"""Which band each layer type of a model attends under (`MaskSpec`, from `kernels.masks`).

- causal: key index ≤ query index; a causal sliding layer also needs `i - j < W` (transformers);
- bidirectional sliding layers, by `bidirectional_window`:
  `"half"` |i−j| ≤ W//2 (transformers' `Gemma3TextConfig(use_bidirectional_attention=True)`),
  `"full"` |i−j| ≤ W (transformers' generic `is_causal=False`), `"none"` no window;
- padding and packed documents are the call's `Segments`, the same in both modes.
"""

from __future__ import annotations

from bidirlm_jax.kernels.masks import MaskSpec
from bidirlm_jax.models.config import SLIDING, ModelConfig
from bidirlm_jax.models.runtime import Runtime


def mask_spec(config: ModelConfig, runtime: Runtime, layer_type: str) -> MaskSpec:
    """The band of one layer type under the run's attention mode and bidirectional window."""
    causal = runtime.attention == "causal"
    if layer_type != SLIDING:
        return MaskSpec(None, 0 if causal else None)
    w = config.sliding_window
    if causal:
        return MaskSpec(w - 1, 0)  # i - j < W
    half = {"half": w // 2, "full": w, "none": None}[runtime.bidirectional_window]
    return MaskSpec(half, half)


def layer_specs(config: ModelConfig, runtime: Runtime) -> dict[str, MaskSpec]:
    """`{layer_type: MaskSpec}` for the layer types present, in order of first appearance."""
    return {lt: mask_spec(config, runtime, lt) for lt in dict.fromkeys(config.layer_types)}
