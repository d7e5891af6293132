"""The released BidirLM text checkpoints (`model_type: bidirlm`, remote code `configuration_bidirlm.py` /
`modeling_bidirlm.py`): their config.json read as the transformers-native config of the same model, and a
native config written back in their format. Pure dictionary edits: no remote code runs, none is copied.

What the released files hold (BidirLM-270M/0.6B/1B/1.7B, their `-Base` MNTP checkpoints, and the authors'
earlier `biqwen3` / `bigemma3_text` types, whose code is public in Diabolocom-Research/Decoder2Encoder):
- the text family's own fields (Qwen3's or Gemma3's names, flat, as a project loading BidirLM-0.6B-Base
  reads `config.hidden_size`); a nested `text_config`, as the Omni release has, is read too;
- always bidirectional, with a padding-only mask; the Gemma-based ones declare the Gemma window (512) with
  `use_bidirectional_attention`, and their config class halves it on load: sliding layers see |i−j| ≤ W//2,
  our `"half"` mode (transformers' own `use_bidirectional_attention`), so exports must write W, not W//2;
- the classifier's pooling as `clf_pooling` (the Qwen and Omni code) or `classifier_pooling` (the Gemma code),
  `bos | mean | late`.
Which family a flat config is cannot be read from a field known offline: `FAMILY_KEYS` names the spellings
we accept, else Gemma3's own fields (`GEMMA3_FIELDS`) or a sliding layer mark it Gemma3-based, else Qwen3.

Writing (`to_released`) keeps the native fields, renames the type and points `auto_map` at a released
repository's code (`repo--module.Class`: transformers fetches it from the Hub; nothing is vendored).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.families import RELEASED_MODEL_TYPES

BIDIRLM = "bidirlm"
# Spellings of an explicit family field we accept (no released config is known offline to carry one).
FAMILY_KEYS = ("text_model_type", "base_model_type", "backbone_model_type")
_FAMILIES = {"qwen3": "qwen3", "gemma3": "gemma3_text", "gemma3_text": "gemma3_text"}
GEMMA3_FIELDS = ("query_pre_attn_scalar", "hidden_activation", "rope_local_base_freq", "final_logit_softcapping")
POOLING_KEYS = ("clf_pooling", "classifier_pooling")  # the released classifier's pooling, either spelling
CLF_POOLINGS = {"bos": "first", "mean": "mean", "late": "late"}  # theirs -> our head pooling
# Where `to_released` points `auto_map` by default: a released checkpoint of the family, which holds the code.
CODE_REPOS = {"qwen3": "BidirLM/BidirLM-0.6B-Base", "gemma3_text": "BidirLM/BidirLM-1B-Base"}
CONFIG_CLASS = "configuration_bidirlm.BidirLMConfig"
MODEL_CLASSES = {
    "AutoModel": "modeling_bidirlm.BidirLMModel",
    "AutoModelForMaskedLM": "modeling_bidirlm.BidirLMForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_bidirlm.BidirLMForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_bidirlm.BidirLMForTokenClassification",
}
MASKED_LM = "BidirLMForMaskedLM"
CLASSIFIER_KEY = "classifier.weight"  # the released sequence and token classifiers' last layer


def is_released(d: Any) -> bool:
    """Whether a config.json dict is a released BidirLM text config."""
    return isinstance(d, Mapping) and d.get("model_type") in RELEASED_MODEL_TYPES


def as_native(d: Any) -> Any:
    """`native_config(d)` for a released config, anything else as it is."""
    return native_config(d) if is_released(d) else d


def native_config(d: Mapping[str, Any]) -> dict[str, Any]:
    """The transformers-native text config (`qwen3` / `gemma3_text`) of the model a released config describes,
    bidirectional as the released code runs it; every other field is kept (the remote-code ones too)."""
    nested = d.get("text_config")
    if nested is not None and not isinstance(nested, Mapping):
        raise ConfigError(f"the bidirlm config's text_config must be a JSON object, got {type(nested).__name__}")
    out = {k: copy.deepcopy(v) for k, v in d.items() if k != "text_config"}
    out.update(copy.deepcopy(dict(nested or {})))
    out["model_type"] = _family_type(d, nested or {})
    if out["model_type"] == "gemma3_text":
        out["use_bidirectional_attention"] = True  # the released config halves the window itself: "half"
        out.pop("is_causal", None)
    else:
        out["is_causal"] = False
    return out


def _family_type(d: Mapping[str, Any], nested: Mapping[str, Any]) -> str:
    """`qwen3` or `gemma3_text`: an explicit field, the nested config's type, the type's own, or Gemma3's fields."""
    named = [d.get(k) or nested.get(k) for k in FAMILY_KEYS] + [nested.get("model_type")]
    named.append(RELEASED_MODEL_TYPES[d["model_type"]])
    for value in filter(None, named):
        if value not in _FAMILIES:
            raise ConfigError(
                f"the bidirlm config names its text family {value!r}; bidirlm-jax reads Qwen3- and Gemma3-based "
                f"ones ({', '.join(_FAMILIES)})"
            )
        return _FAMILIES[value]
    fields = {**d, **nested}
    if any(k in fields for k in GEMMA3_FIELDS) or "sliding_attention" in (fields.get("layer_types") or ()):
        return "gemma3_text"
    if "hidden_size" not in fields:
        raise ConfigError(
            "this bidirlm config.json describes no text model (no hidden_size at the top or in text_config); "
            "check that it is a BidirLM text checkpoint's"
        )
    return "qwen3"


def check_attention(d: Any, attention: str, bidirectional_window: str | None = None) -> None:
    """Refuse to record in a released config an attention mode its code does not run (it reads no such flag)."""
    if not is_released(d):
        return
    gemma = native_config(d)["model_type"] == "gemma3_text"
    if attention != "bidirectional" or (gemma and bidirectional_window not in (None, "half")):
        raise ConfigError(
            "a released BidirLM checkpoint runs bidirectionally (Gemma3: the half window) whatever its config says: "
            "keep --attention bidirectional, or convert it to the transformers format first (bidirlm convert --to hf)"
        )


def clf_pooling(d: Mapping[str, Any]) -> str | None:
    """The released classifier's pooling (`bos | mean | late`) a config records under either spelling."""
    for holder in (d, d.get("text_config") or {}):
        for key in POOLING_KEYS:
            if holder.get(key) is not None:
                value = holder[key]
                if value not in CLF_POOLINGS:
                    raise ConfigError(
                        f"{key} {value!r} is not one of {tuple(CLF_POOLINGS)} (the released classifiers')"
                    )
                return value
    return None


def to_released(
    native: Mapping[str, Any], *, architecture: str = MASKED_LM, source_auto_map: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A released-format config.json from a native one (`io.hf_config.config_to_hf`'s, bidirectional).

    `auto_map` names the code of the family's released repository (`CODE_REPOS`); a source's own `auto_map`
    (a released checkpoint's: its class names are the true ones) is kept, its local references pointed there."""
    family = native.get("model_type")
    if family not in CODE_REPOS:
        raise ConfigError(f"only Qwen3- and Gemma3-based models have the bidirlm format, not {family!r}")
    gemma = family == "gemma3_text"
    bidirectional = native.get("use_bidirectional_attention") if gemma else native.get("is_causal") is False
    if not bidirectional:
        raise ConfigError(
            "the released BidirLM code runs every model bidirectionally (Gemma3: |i-j| <= W//2 on sliding layers): "
            "export with attention=bidirectional (and bidirectional_window=half for Gemma3)"
        )
    if native.get("use_sliding_window"):
        raise ConfigError(
            "this Qwen3 model has sliding-window layers, which the released BidirLM code does not run (it attends "
            "to the whole input): export it in the transformers format"
        )
    classes = {"AutoConfig": CONFIG_CLASS, **MODEL_CLASSES}
    classes.update({auto: ref for auto, ref in (source_auto_map or {}).items() if isinstance(ref, str)})
    out = dict(copy.deepcopy(dict(native)))
    out.update(
        model_type=BIDIRLM,
        architectures=[architecture],
        auto_map={auto: ref if "--" in ref else f"{CODE_REPOS[family]}--{ref}" for auto, ref in classes.items()},
    )
    return out
