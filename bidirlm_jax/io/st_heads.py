"""The authors' classifier (`classifier="eurobert"`: dense → GELU → classifier) exported as a
sentence-transformers model, since no transformers class puts that head on a Gemma3 / Qwen3 backbone
(`EuroBertForSequenceClassification` has it, on EuroBERT's own backbone only).

The directory is the backbone as `save_pretrained` writes it (native config, bidirectional as transformers
reads it, no remote code) and sentence-transformers' stock modules, so `SentenceTransformer(dir).encode(texts)`
returns the head's logits:
- `mean` / `first` / `last`: Transformer → Pooling → Dense(d→d, bias, `torch.nn.GELU`, exact) →
  Dense(d→labels, bias, identity);
- `late`: Transformer → Dense(d→d, GELU) → Dense(d→labels) on `token_embeddings` (every token; their
  `module_input_name`, which the lock's sentence-transformers 6.2 has and releases without it cannot load)
  → mean Pooling over the mask, i.e. the masked mean of the per-token logits.
config.json carries `id2label` / `label2id`; `head.json` the head and its labels. Dropout is a training-time
setting and is not exported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.companions import Companions
from bidirlm_jax.io.hf import save_pretrained
from bidirlm_jax.io.run import HEAD_FILE
from bidirlm_jax.io.sentence_transformers import _ALL_ST_FLAGS, _ST_POOLING_FLAGS
from bidirlm_jax.io.weights.save import to_host
from bidirlm_jax.models.heads import EncoderWithHead

_GELU = "torch.nn.modules.activation.GELU"  # `nn.GELU()`: approximate="none", the exact GELU the head uses
_IDENTITY = "torch.nn.modules.linear.Identity"
_MODULE = "sentence_transformers.models."


def _label_names(model: EncoderWithHead, labels: Sequence[str] | None) -> list[str]:
    head = model.head_config
    if head.task == "regression":
        return ["LABEL_0"]
    names = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(head.num_labels)]
    if len(names) != head.num_labels or len(set(names)) != len(names):
        raise ConfigError(f"labels {names} do not name the head's {head.num_labels} outputs once each")
    return names


def _modules(pooling: str) -> list[tuple[str, str, dict]]:
    """(folder, module type, options) in order; options say which features a Dense reads and writes."""
    tokens = {"module_input_name": "token_embeddings", "module_output_name": "token_embeddings"}
    if pooling == "late":
        return [
            ("1_Dense", "Dense", {**tokens, "act": _GELU, "w": "dense"}),
            ("2_Dense", "Dense", {**tokens, "act": _IDENTITY, "w": "classifier"}),
            ("3_Pooling", "Pooling", {"mode": "mean"}),
        ]
    return [
        ("1_Pooling", "Pooling", {"mode": pooling}),
        ("2_Dense", "Dense", {"act": _GELU, "w": "dense"}),
        ("3_Dense", "Dense", {"act": _IDENTITY, "w": "classifier"}),
    ]


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def export_st_classifier(
    model: EncoderWithHead,
    out_dir: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    max_length: int = 512,
    dtype: str | None = None,
    overwrite: bool = False,
    extra_files: Companions | None = None,
) -> Path:
    """Write `model` (an `EncoderWithHead` with the `eurobert` classifier) as a sentence-transformers directory
    whose `encode` gives the head's logits (see the module doc). Checked before writing; appears atomically;
    in a multi-process run every process calls this (tensors are gathered, process 0 writes)."""
    if not isinstance(model, EncoderWithHead) or model.head_config.classifier != "eurobert":
        raise ConfigError("export_st_classifier exports the eurobert classifier; a linear one has export_classifier")
    head = model.head_config
    names = _label_names(model, labels)
    weights = {
        name: (to_host(getattr(model.head, name)[...]), to_host(getattr(model.head, f"{name}_bias")[...]))
        for name in ("dense", "classifier")
    }
    d = model.config.hidden_size
    writes = jax.process_index() == 0
    with atomic_directory(out_dir, overwrite=overwrite, collective=True) as tmp:
        save_pretrained(model.encoder, tmp, dtype=dtype, overwrite=True, extra_files=extra_files)
        if not writes:
            return Path(out_dir)
        config = json.loads((tmp / "config.json").read_text())
        config.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / HEAD_FILE, {"head": head.to_json(), "labels": [] if head.task == "regression" else names})
        modules = [{"idx": 0, "name": "0", "path": "", "type": _MODULE + "Transformer"}]
        for idx, (folder, kind, options) in enumerate(_modules(head.pooling), start=1):
            modules.append({"idx": idx, "name": str(idx), "path": folder, "type": _MODULE + kind})
            (tmp / folder).mkdir()
            if kind == "Pooling":
                width = head.num_labels if head.pooling == "late" else d
                flags = {flag: flag == _ST_POOLING_FLAGS[options["mode"]] for flag in _ALL_ST_FLAGS}
                _write_json(
                    tmp / folder / "config.json", {"word_embedding_dimension": width, **flags, "include_prompt": True}
                )
                continue
            w, b = (np.ascontiguousarray(a, np.float32) for a in weights[options["w"]])
            names_io = {k: options[k] for k in ("module_input_name", "module_output_name") if k in options}
            dense = {
                "in_features": int(w.shape[1]),
                "out_features": int(w.shape[0]),
                "bias": True,
                "activation_function": options["act"],
                **names_io,
            }
            _write_json(tmp / folder / "config.json", dense)
            save_file({"linear.weight": w, "linear.bias": b}, str(tmp / folder / "model.safetensors"))
        _write_json(tmp / "modules.json", modules)
        _write_json(tmp / "sentence_bert_config.json", {"max_seq_length": int(max_length), "do_lower_case": False})
        _write_json(
            tmp / "config_sentence_transformers.json",
            {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None},
        )
    return Path(out_dir)
