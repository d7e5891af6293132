"""The merge-ratio sweep of the paper's Figure 4: interpolate an adapted model with its base in memory at
ratios 0…1 and score each mixture.

The ratio is the paper's "merging ratio": the weight on the *base* (θ = r·θ_base + (1 − r)·θ_adapted, so 0 is
the adapted model and 1 the base; paper-recipe §4.2). Nothing is written per ratio: both parameter sets are
loaded once and every mixture is made by `merge.linear.interpolate`, the kernel the streamed merge uses. Both
ends are exact: a ratio up to ½ is computed from the adapted side (`adapted + r·(base − adapted)`), a larger one
from the base side (`base + (1 − r)·(adapted − base)`), and the kernel returns its first input bit for bit at
weight 0 — so ratio 0 *is* the adapted model and ratio 1 *is* the base.

What each mixture is scored on is the caller's `evaluate(model) -> {metric: value}`. The harness's default,
`mntp_scorer`, is MNTP masked-token accuracy on held-out text, evaluated in bidirectional attention. Why that
and not a fine-tuned score: it needs no training per ratio (a fine-tuning run per point would cost as much as
a column of the ablation table, and its run-to-run noise would swamp the differences between neighbouring
ratios at small scale), it is deterministic (masks are drawn per text from a fixed seed), and it measures
exactly what merging trades away — the bidirectional adaptation that MNTP bought, which ratio 1 (the causal
base read bidirectionally, i.e. Bi+Base) does not have. The paper's own Figure 4 fine-tunes at each ratio; pass
an `evaluate` that does so (or that runs retrieval) to reproduce it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bidirlm_jax.errors import ConfigError

DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def check_ratios(ratios: Sequence[float]) -> list[float]:
    """The ratios as floats, each in [0, 1], at least one, none twice."""
    try:
        out = [float(r) for r in ratios]
    except (TypeError, ValueError):
        raise ConfigError(f"merge ratios must be numbers in [0, 1], got {list(ratios)!r}") from None
    if not out:
        raise ConfigError("the merge-ratio sweep needs at least one ratio")
    if bad := [r for r in out if not 0.0 <= r <= 1.0]:
        raise ConfigError(f"merge ratios {bad} are outside [0, 1] (the weight on the base)")
    if len(set(out)) != len(out):
        raise ConfigError(f"merge ratios {out} repeat a value")
    return out


def mix(adapted_params: Any, base_params: Any, ratio: float) -> Any:
    """r·base + (1 − r)·adapted, leaf by leaf; ratio 0 returns `adapted_params`' values and 1 `base_params`'
    bit for bit (see the module doc)."""
    from bidirlm_jax.merge.linear import interpolate

    if ratio <= 0.5:
        return interpolate(adapted_params, base_params, ratio)
    return interpolate(base_params, adapted_params, 1.0 - ratio)


def merge_ratio_sweep(
    adapted: str | os.PathLike,
    base: str | os.PathLike,
    evaluate: Callable[[Any], Mapping[str, float]],
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    attention: str = "bidirectional",
    on_point: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Score the interpolations of `adapted` (e.g. Bi+MNTP) and `base` (its causal base), both HF directories
    of one architecture, at each merge ratio (the weight on the base).

    `evaluate(model)` gets a `Transformer` in `attention` mode holding the mixture and returns its scores
    (e.g. `mntp_scorer(texts, tokenizer)`). Returns one `{"ratio": r, **scores}` per ratio, in the given order;
    `on_point` is called with each as it is ready. Nothing is written to disk.
    """
    from flax import nnx

    from bidirlm_jax.io.hf import from_pretrained

    ratios = check_ratios(ratios)
    model = from_pretrained(adapted, attention=attention, dtype="float32")
    graphdef, adapted_params, rest = nnx.split(model, nnx.Param, ...)
    base_params = nnx.state(from_pretrained(base, attention=attention, dtype="float32"), nnx.Param)
    mine = {key for key, _ in nnx.to_flat_state(adapted_params)}
    theirs = {key for key, _ in nnx.to_flat_state(base_params)}
    if mine != theirs:
        raise ConfigError(
            f"{adapted} and {base} do not hold the same parameters ({len(mine ^ theirs)} differ); the sweep "
            "interpolates a model with its own base"
        )
    points = []
    for ratio in ratios:
        mixed = nnx.merge(graphdef, mix(adapted_params, base_params, ratio), rest)
        point = {"ratio": ratio, **{k: float(v) for k, v in evaluate(mixed).items()}}
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points


def mntp_scorer(
    texts: Sequence[str], tokenizer: Any, *, mask_ratio: float = 0.3, max_length: int = 128, batch_size: int = 16
) -> Callable[[Any], dict[str, float]]:
    """`evaluate` for `merge_ratio_sweep`: MNTP masked accuracy and loss on `texts` (`evals.lm.evaluate_mntp`,
    the same masks at every ratio)."""
    from bidirlm_jax.evals.lm import evaluate_mntp

    if not texts:
        raise ConfigError("the sweep's held-out texts are empty; give some text to score the mixtures on")

    def score(model: Any) -> dict[str, float]:
        out = evaluate_mntp(
            model, tokenizer, texts, mask_ratio=mask_ratio, max_length=max_length, batch_size=batch_size
        )
        return {"masked_accuracy": out["masked_accuracy"], "loss": out["loss"]}

    return score
