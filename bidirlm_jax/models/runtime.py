"""How a model runs, declared once: attention mode and window, dtypes, remat, the attention kernel and its
block sizes, scanned layers. None of these changes a weight; `ModelConfig` says what the weights are.

The model, `from_pretrained`, the train config and the CLI all take this one declaration: the train
config's `model.*` run keys are `TRAIN_KEYS` with `Runtime`'s defaults, the CLI's choices are the constants
below, and `check` is the only validation (its errors name the setting, what it may be, and the key to fix).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bidirlm_jax.errors import ConfigError

ATTENTION_MODES = ("causal", "bidirectional")
BIDIRECTIONAL_WINDOWS = ("half", "full", "none")  # Gemma3's sliding layers when bidirectional (models.masks)
REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blocked", "reference", "chunked", "splash", "triton")  # kernels.attention
_CHOICES = {
    "attention": ATTENTION_MODES,
    "bidirectional_window": BIDIRECTIONAL_WINDOWS,
    "dtype": DTYPES,
    "param_dtype": DTYPES,
    "remat": REMAT_POLICIES,
    "attention_impl": ATTENTION_IMPLS,
}


@dataclass(frozen=True)
class Runtime:
    """Run settings of one model; frozen and hashable (NNX keeps it in the model's static graph definition)."""

    attention: str = "causal"
    bidirectional_window: str = "half"
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS; auto picks splash on TPU, cuDNN/Triton on GPU, XLA on CPU
    attention_block_q: int = 512  # query / key block sizes of the blocked kernels (splash, chunked), clipped to T
    attention_block_kv: int = 512
    scan_layers: bool = False  # one scanned layer over stacked parameters: compile time flat in depth

    def __post_init__(self):
        check(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> Runtime:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], *, prefix: str = "", **changes: Any) -> Runtime:
        """The run settings among `settings` (a train config's `model` section: other keys are ignored), with
        `changes` on top; errors name each key as `prefix + name` (e.g. `model.remat`)."""
        values = {name: settings[name] for name in FIELDS if name in settings}
        values.update(changes)
        check(values, prefix=prefix)
        return cls(**values)


FIELDS = tuple(f.name for f in dataclasses.fields(Runtime))
# What a training run declares: every setting but the parameter dtype (master weights stay fp32).
TRAIN_KEYS = tuple(name for name in FIELDS if name != "param_dtype")


def check(values: Mapping[str, Any], *, prefix: str = "") -> None:
    """Refuse a run setting the model cannot take, saying which, what it may be and (with a prefix) the key."""
    for name, value in values.items():
        if name not in FIELDS:
            raise ConfigError(f"unknown run setting {prefix}{name!s}; the settings are {', '.join(FIELDS)}")
        allowed = _CHOICES.get(name)
        if allowed is not None and value not in allowed:
            problem = f"is not one of {allowed}"
        elif name in ("attention_block_q", "attention_block_kv") and not (isinstance(value, int) and value > 0):
            problem = "must be a positive integer"
        elif name == "scan_layers" and not isinstance(value, bool):
            problem = "must be True or False"
        else:
            continue
        where = f"; fix --config.{prefix}{name}" if prefix else ""
        raise ConfigError(f"{prefix or 'invalid run setting: '}{name}={value!r} {problem}{where}")


DEFAULT_RUNTIME = Runtime()  # a plain fp32 causal run: what a model gets when nothing is declared
