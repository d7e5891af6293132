"""Low-rank adapters (LoRA) on the text stack's attention and MLP projections, as PEFT defines them.

A projection `y = x Wᵀ` gains `s · (dropout(x) Aᵀ) Bᵀ` with `A` [r, *in] and `B` [*out, r] (fp32; `s = alpha / r`),
`A` drawn as PEFT draws it (uniform ±1/√in), `B` zero, so an adapted model starts equal to its base. The
adapter path runs in fp32 whatever the compute dtype (PEFT casts the input to the adapter's dtype) and its sum is
cast back. Adapters are attached to a built model (`add_adapters`) as `{name}_lora` submodules beside the weight
they adapt (`layers.adapter_of` finds them), carry the weight's logical axes (the rank axis unsharded), and in a
scanned stack are stacked on the weights' leading `layers` axis. Their parameters are `LoRAParam`s (an `nnx.Param`
kind), which is how training selects them. `merge_adapters` folds them into the weights, `W + s·B·A`.

Dropout (PEFT's `lora_dropout`, on the adapter's input) draws from the key of the enclosing `dropout_key` scope,
folded with the layer (`layer_scope`, which the stack enters for every layer, unrolled or scanned alike) and the
projection, so a layer's masks are the same however the stack runs; outside a scope (evaluation) it is off. The
training step opens one scope per step (`train.lora.adapter_grads`): its micro-batches (gradient accumulation,
GradCache chunks) draw the same masks, each row of a micro-batch its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.layers import ADAPTER_SUFFIX, LAYER_AXIS

# PEFT's module names, ours too: (owner attribute in a block, projection weight, input dims contracted)
TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("attn", 1),
    "k_proj": ("attn", 1),
    "v_proj": ("attn", 1),
    "o_proj": ("attn", 2),
    "gate_proj": ("mlp", 1),
    "up_proj": ("mlp", 1),
    "down_proj": ("mlp", 1),
}


class LoRAParam(nnx.Param):
    """An adapter parameter: trained while the `nnx.Param`s it adapts stay frozen."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Rank `rank` (0: no adapters), `alpha` (the update is scaled by alpha / rank), input `dropout`, the
    projections adapted (`targets`, names among `TARGETS`)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"lora.rank={self.rank} must be 0 (off) or positive; fix --config.lora.rank")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must lie in [0, 1); fix --config.lora.dropout")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or (self.rank and not self.targets):
            raise ConfigError(
                f"lora.targets={self.targets!r}: choose a non-empty subset of {tuple(TARGETS)}; fix --config.lora.targets"
            )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, lora) -> LoRAConfig:
        """From a train config's `lora` section (absent: off)."""
        if lora is None:
            return cls()
        targets = lora.targets
        targets = tuple(t.strip() for t in targets.split(",") if t.strip()) if isinstance(targets, str) else targets
        return cls(rank=int(lora.rank), alpha=float(lora.alpha), dropout=float(lora.dropout), targets=tuple(targets))


# --- dropout keys (trace-time scopes) --------------------------------------------------------------------

_keys: list[jax.Array] = []
_layers: list[jax.Array | int] = []


@contextlib.contextmanager
def dropout_key(key: jax.Array) -> Iterator[None]:
    """Adapters called (traced) inside draw their dropout masks from `key`."""
    _keys.append(key)
    try:
        yield
    finally:
        _keys.pop()


@contextlib.contextmanager
def layer_scope(index: jax.Array | int) -> Iterator[None]:
    """The stack runs layer `index` (a traced scalar in a scan) inside: its adapters fold it into their keys."""
    _layers.append(index)
    try:
        yield
    finally:
        _layers.pop()


# --- the adapter ------------------------------------------------------------------------------------------


class Adapter(nnx.Module):
    """`x [..., *in] -> s · (dropout(x) Aᵀ) Bᵀ [..., *out]` in fp32; `site` tells its dropout masks apart."""

    def __init__(
        self,
        weight: nnx.Param,
        in_dims: int,
        lora: LoRAConfig,
        site: int,
        *,
        rngs: nnx.Rngs,
        layers: int | None = None,
    ):
        """`weight` the projection [(layers,) *out, *in] (`layers` when stacked), read for shapes and axes."""
        axes = tuple(weight.get_metadata().get("out_sharding") or (None,) * weight.ndim)
        lead = 0 if layers is None else 1
        shape = weight.shape[lead:]
        out_shape, in_shape = shape[: len(shape) - in_dims], shape[len(shape) - in_dims :]
        out_axes, in_axes = axes[lead : len(axes) - in_dims], axes[len(axes) - in_dims :]
        stack, stack_axes = ((layers,), (LAYER_AXIS,)) if layers is not None else ((), ())
        r, fan_in = lora.rank, math.prod(in_shape)
        bound = 1.0 / math.sqrt(fan_in)  # PEFT: kaiming_uniform_(a=√5) on [r, in]
        a = jax.random.uniform(rngs.params(), (*stack, r, *in_shape), jnp.float32, -bound, bound)
        self.lora_a = LoRAParam(a, out_sharding=(*stack_axes, None, *in_axes), eager_sharding=False)
        b = jnp.zeros((*stack, *out_shape, r), jnp.float32)
        self.lora_b = LoRAParam(b, out_sharding=(*stack_axes, *out_axes, None), eager_sharding=False)
        self.in_dims, self.scale, self.dropout, self.site = in_dims, lora.scale, lora.dropout, site

    def _dropped(self, x: jax.Array) -> jax.Array:
        if not self.dropout or not _keys:
            return x
        key = jax.random.fold_in(jax.random.fold_in(_keys[-1], _layers[-1] if _layers else 0), self.site)
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = self.lora_a[...], self.lora_b[...]
        r = a.shape[0]
        lead, out = x.shape[: x.ndim - self.in_dims], b.shape[:-1]
        h = self._dropped(x.astype(jnp.float32)).reshape(-1, math.prod(a.shape[1:]))
        h = jnp.dot(jnp.dot(h, a.reshape(r, -1).T), b.reshape(-1, r).T)
        return (self.scale * h).reshape(*lead, *out)


def text_stack(model: nnx.Module):
    """The text `Transformer` inside `model` (itself, or an encoder with a head's `encoder`): the module with
    `layers` and a config listing their types (named by shape: the stack imports this module)."""
    for candidate in (model, getattr(model, "encoder", None)):
        if hasattr(candidate, "layers") and hasattr(getattr(candidate, "config", None), "layer_types"):
            return candidate
    raise ConfigError(f"LoRA adapts a text Transformer; {type(model).__name__} holds none")


def _blocks(model: nnx.Module) -> tuple[list[nnx.Module], int | None]:
    """The blocks to adapt and, for a scanned stack (one block of stacked weights), the layer count."""
    stack = text_stack(model)
    if stack.runtime.scan_layers:
        return [stack.layers], len(stack.config.layer_types)
    return list(stack.layers), None


def add_adapters(model: nnx.Module, lora: LoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """`model` (changed in place and returned) with an adapter on every targeted projection of its text stack."""
    if not lora.enabled:
        return model
    blocks, layers = _blocks(model)
    for block in blocks:
        for site, name in enumerate(lora.targets):
            owner, in_dims = TARGETS[name]
            module = getattr(block, owner)
            weight = getattr(module, name)
            setattr(module, name + ADAPTER_SUFFIX, Adapter(weight, in_dims, lora, site, rngs=rngs, layers=layers))
    return model


def adapters(model: nnx.Module) -> Iterator[tuple[nnx.Module, str, Adapter]]:
    """`(owner module, projection name, adapter)` for every adapter in `model`'s text stack."""
    blocks, _ = _blocks(model)
    for block in blocks:
        for name, (owner, _) in TARGETS.items():
            module = getattr(block, owner)
            adapter = getattr(module, name + ADAPTER_SUFFIX, None)
            if adapter is not None:
                yield module, name, adapter


def has_adapters(model: nnx.Module) -> bool:
    return next(adapters(model), None) is not None


def delta(adapter: Adapter) -> jax.Array:
    """`s · B A` in fp32, shaped like the weight it adapts (stacked when the adapter is)."""
    a, b = adapter.lora_a[...], adapter.lora_b[...]
    lead = a.ndim - 1 - adapter.in_dims  # 1 when stacked on `layers`
    r = a.shape[lead]
    a2 = a.reshape(*a.shape[:lead], r, -1)
    b2 = b.reshape(*b.shape[:lead], -1, r)
    w = jnp.einsum("...or,...ri->...oi", b2, a2)
    return adapter.scale * w.reshape(*b.shape[:-1], *a.shape[lead + 1 :])


def merge_adapters(model: nnx.Module) -> nnx.Module:
    """A copy of `model` without adapters, each adapted weight replaced by `W + s·B·A` (summed in fp32, stored in
    W's dtype); the input is left as it was."""
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # new modules and variables, the same arrays
    for module, name, adapter in list(adapters(merged)):
        weight = getattr(module, name)
        value = weight.get_value()
        weight.set_value((value.astype(jnp.float32) + delta(adapter)).astype(value.dtype))
        delattr(module, name + ADAPTER_SUFFIX)
    return merged


def cast_frozen(model: nnx.Module, dtype: str, trained: nnx.filterlib.Filter = LoRAParam) -> nnx.Module:
    """`model` (in place) with every parameter that `trained` does not select (the frozen base) stored as `dtype`;
    the trained ones (adapters, a task head) keep theirs."""
    keep = nnx.filterlib.to_predicate(trained)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not keep(path, var):
            var.set_value(var.get_value().astype(dtype))
    return model


def targets_of(names: Sequence[str]) -> tuple[str, ...]:
    """The projections in `names` in `TARGETS`' order (what `adapter_config.json` lists)."""
    return tuple(t for t in TARGETS if t in names)
