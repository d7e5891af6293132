"""Tiny checkpoints in the released BidirLM layouts (`model_type: bidirlm`), written from a transformers-native
directory's tensors by hand (as the released files are, independently of `io.released`): the same model in
another layout, so a loaded one must equal the native one loaded bidirectionally."""

import json
import shutil

import numpy as np
from safetensors.numpy import save_file

from tests.hf_files import tensors

# The released classes, as their `auto_map` names them (the class names are an assumption; the layouts are
# those of the authors' public BiQwen3 / BiGemma3 code: backbone under `model.`, heads beside it).
CLASSES = {
    "base": "BidirLMModel",
    "masked_lm": "BidirLMForMaskedLM",
    "sequence": "BidirLMForSequenceClassification",
    "token": "BidirLMForTokenClassification",
}
LAYOUTS = tuple(CLASSES)


def released_config(native: dict, layout: str, *, pooling_key="clf_pooling", pooling="late", num_labels=3) -> dict:
    """A released config.json: the family's own fields, flat, bidirectional, the remote code in `auto_map`."""
    d = {k: v for k, v in native.items() if k not in ("is_causal", "use_bidirectional_attention")}
    if native["model_type"] == "gemma3_text":
        d["use_bidirectional_attention"] = True  # with the declared window, which their config halves on load
    d.update(
        model_type="bidirlm",
        architectures=[CLASSES[layout]],
        auto_map={
            "AutoConfig": "configuration_bidirlm.BidirLMConfig",
            **{f"AutoModel{s}": f"modeling_bidirlm.{c}" for s, c in zip(("", "ForMaskedLM"), CLASSES.values())},
        },
        mask_token_id=4,
    )
    d[pooling_key] = pooling
    if layout in ("sequence", "token"):
        d.update(
            id2label={str(i): f"L{i}" for i in range(num_labels)}, label2id={f"L{i}": i for i in range(num_labels)}
        )
    return d


def head_tensors(hidden: int, layout: str, *, num_labels: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """The released heads' tensors: dense (d->d) + classifier (d->labels) for sequences, classifier for tokens."""
    rng = np.random.default_rng(seed)
    out = {}
    if layout == "sequence":
        out["dense.weight"] = rng.standard_normal((hidden, hidden), np.float32) * 0.1
        out["dense.bias"] = rng.standard_normal(hidden, np.float32) * 0.1
    if layout in ("sequence", "token"):
        out["classifier.weight"] = rng.standard_normal((num_labels, hidden), np.float32) * 0.1
        out["classifier.bias"] = rng.standard_normal(num_labels, np.float32) * 0.1
    return out


def write_released(native_dir, out, layout: str = "masked_lm", **config_kw):
    """`native_dir` (a transformers causal LM directory) rewritten in a released layout at `out`, with the
    native directory's other files (tokenizer)."""
    shutil.copytree(native_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json", "config.json"))
    native = json.loads((native_dir / "config.json").read_text())
    weights = tensors(native_dir)
    if layout != "masked_lm":
        weights.pop("lm_head.weight", None)
    if layout == "base":
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
    weights.update(head_tensors(native["hidden_size"], layout, num_labels=config_kw.get("num_labels", 3)))
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(released_config(native, layout, **config_kw), indent=2))
    return out
