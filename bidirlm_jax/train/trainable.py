"""Which parameters a run trains: the rest are frozen (a vision or audio tower kept as it was trained).

A frozen parameter holds no optimizer state (no Adam moments: for a tower that is twice its size in fp32
saved per device), gets no update, and its gradient never leaves the step, so XLA drops the computation
that would only feed it. Parameters are chosen by regexes on their paths (`embedder/embedding`,
`layers/3/mlp/up_proj`; `optim.trainable` / `optim.frozen`) or, from code, by any nnx filter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from flax import nnx

from bidirlm_jax.errors import ConfigError

Filter = nnx.filterlib.Filter


def param_path(path) -> str:
    """`("layers", 0, "attn", "q_proj")` → `"layers/0/attn/q_proj"`: what the regexes match."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _compile(patterns: Sequence[str], key: str) -> list[re.Pattern]:
    if isinstance(patterns, str):
        raise ConfigError(f"{key}={patterns!r} must be a list of regexes, e.g. --config.{key}='(\"visual/.*\",)'")
    try:
        return [re.compile(p) for p in patterns]
    except re.error as e:
        raise ConfigError(f"{key}: {e.pattern!r} is not a regular expression ({e})") from None


def regex_filter(trainable: Sequence[str] = (), frozen: Sequence[str] = ()) -> Filter:
    """Parameters whose path fully matches a `trainable` regex (every one when none is given) and no `frozen` one."""
    keep, drop = _compile(trainable, "optim.trainable"), _compile(frozen, "optim.frozen")

    def selected(path, value) -> bool:
        name = param_path(path)
        return (not keep or any(p.fullmatch(name) for p in keep)) and not any(p.fullmatch(name) for p in drop)

    return selected


def from_config(optim) -> Filter:
    """The `optim` section's choice: `nnx.Param` (everything) unless `optim.trainable` / `optim.frozen` say."""
    trainable, frozen = tuple(optim.get("trainable", ())), tuple(optim.get("frozen", ()))
    return regex_filter(trainable, frozen) if trainable or frozen else nnx.Param


def split(params: nnx.State, trainable: Filter) -> tuple[nnx.State, nnx.State]:
    """`(trainable, frozen)` parts of a parameter state (or of anything shaped like it: gradients)."""
    return nnx.split_state(params, trainable, ...)


def check(params: nnx.State, optim) -> None:
    """Refuse regexes that select nothing (a typo would silently train or freeze everything) and a run that
    trains nothing."""
    names = [param_path(path) for path, _ in nnx.to_flat_state(params)]
    for key in ("trainable", "frozen"):
        for pattern in _compile(tuple(optim.get(key, ())), f"optim.{key}"):
            if not any(pattern.fullmatch(n) for n in names):
                raise ConfigError(
                    f"optim.{key}: {pattern.pattern!r} matches no parameter path (paths look like "
                    f"{', '.join(names[:3])}, ...); fix the regex"
                )
    chosen, _ = split(params, from_config(optim))
    if not nnx.to_flat_state(chosen):
        raise ConfigError("optim.trainable / optim.frozen leave no parameter to train; free at least one")
