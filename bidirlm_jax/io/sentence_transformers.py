"""The encoder directory: an HF model directory that sentence-transformers also loads, and reading it back.

`export_encoder` writes the weights with `save_pretrained` (native config, bidirectional as transformers reads
it, no remote code) plus sentence-transformers' files: `modules.json` (Transformer -> Pooling -> Normalize),
`1_Pooling/config.json`, `2_Normalize/`, `sentence_bert_config.json` and `config_sentence_transformers.json`
(query prompts, cosine similarity). The module types and pooling keys are the long-standing ones
(`sentence_transformers.models.*`, `pooling_mode_*_tokens`), which every sentence-transformers release from
2.x to 6.x reads. `include_prompt` is true: the instruction tokens are pooled, as in training. A `first`
pooling export writes `padding_side: right` into its tokenizer config (see `_ST_POOLING_FLAGS`).
`read_encoder_settings` / `load_encoder` read such a directory back for `encode`, `bidirlm embed` and `eval`.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.atomic import atomic_directory, check_destination
from bidirlm_jax.io.checkpoint import is_checkpoint, recorded_dtypes, run_config
from bidirlm_jax.io.companions import ENCODER_MODULES, companion_files
from bidirlm_jax.io.hf import from_pretrained, save_pretrained, stored_dtypes
from bidirlm_jax.io.hf_config import read_runtime
from bidirlm_jax.io.run import description_dir, is_training_run, prompts_file
from bidirlm_jax.models.config import POOLING_MODES
from bidirlm_jax.models.runtime import ATTENTION_MODES, DTYPES
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.paths import user_path

# our pooling mode -> sentence-transformers' legacy flag. Their `lasttoken` takes the last real token under
# either padding side, as ours does; their `cls` takes the first real token only from 5.5 on (5.0-5.4: position
# 0, a pad under left padding), so a `first` export pads right (`_pad_right`), where both agree.
_ST_POOLING_FLAGS = {
    "mean": "pooling_mode_mean_tokens",
    "first": "pooling_mode_cls_token",
    "last": "pooling_mode_lasttoken",
}
_ALL_ST_FLAGS = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)
_FLAG_MODES = {flag: mode for mode, flag in _ST_POOLING_FLAGS.items()}
_ST_MODE_NAMES = {"mean": "mean", "cls": "first", "lasttoken": "last"}  # sentence-transformers >= 5.4 spelling
_MODULES = "modules.json"
_EMBEDDING_MODULES = ("Pooling", "Normalize")  # what encode reproduces after the model (sentence-transformers')
_POOLING_DIR = "1_Pooling"
_NORMALIZE_DIR = "2_Normalize"


@dataclass(frozen=True)
class EncoderSettings:
    """How an encoder directory says to embed: what `encode` needs besides the model and tokenizer."""

    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 512
    prompts: dict[str, str] = field(default_factory=dict)  # e.g. {"query": "Instruct: ...\nQuery: "}
    default_prompt_name: str | None = None  # the prompt sentence-transformers prepends when a call names none
    origin: str = field(default="", compare=False)  # who recorded them ("" = a plain HF directory's defaults)


def export_encoder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    pooling: str = "mean",
    normalize: bool = True,
    max_length: int = 512,
    prompts: dict[str, str] | None = None,
    attention: str = "bidirectional",
    dtype: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    format: str = "transformers",
) -> Path:
    """Turn `src` (an HF directory, a merged one, or a bidirlm checkpoint, with its tokenizer) into an encoder
    directory `dst` that `AutoModel` and `SentenceTransformer` load as-is, without remote code — or, with
    `format="bidirlm"`, as the released BidirLM encoders load (`trust_remote_code=True`, `io.released`).

    `prompts` maps prompt names to the text prepended to inputs (`{"query": query_prompt(instruction)}`);
    `dtype` is the stored precision (default: each tensor's in the source). Written atomically: a failure leaves
    nothing behind.
    """
    src = Path(src)
    _check_export_args(pooling, max_length, attention, dtype)
    if format == "bidirlm" and attention != "bidirectional":
        raise ConfigError("the released BidirLM format is bidirectional: export with attention=bidirectional")
    check_source(src)
    check_destination(dst, overwrite=overwrite)
    tokenizer = _load_tokenizer(src)
    model = from_pretrained(src, attention=attention, dtype="float32", allow_pickle=allow_pickle, text_only=True)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        save_like_source(model, tmp, src, dtype=dtype, allow_pickle=allow_pickle, format=format)
        _record_mask_token(tmp, tokenizer, model.config.family)
        if pooling == "first":
            _pad_right(tmp)
        _offline_tokenizer(tmp)
        modules = dict(pooling=pooling, normalize=normalize, max_length=max_length, prompts=prompts or {})
        write_st_modules(tmp, model.config.hidden_size, **modules)
        card = _model_card(src, model, pooling, normalize, max_length, prompts or {}, released=format == "bidirlm")
        (tmp / "README.md").write_text(card)
    return Path(dst)


def read_encoder_settings(path: str | os.PathLike) -> EncoderSettings:
    """The pooling, normalisation, length and prompts an encoder directory declares; defaults for a plain HF
    directory (mean pooling, normalised, 512 tokens, no prompts). A contrastive training run gives the pooling
    and maximum length it trained with (`contrastive.pooling`, `data.seq_len`)."""
    path = user_path(path)
    if is_training_run(path):
        return _run_settings(path)
    if not (path / _MODULES).is_file():
        return EncoderSettings()
    modules = _read_json(path / _MODULES)
    modules = [m for m in modules if isinstance(m, dict)]  # in the order sentence-transformers runs them
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    after = [m.get("type", "").rsplit(".", 1)[-1] for m in modules[1:]]  # the first runs the model we load
    unknown = sorted(set(after) - set(_EMBEDDING_MODULES))
    if unknown:
        raise ConfigError(
            f"{path}: its sentence-transformers modules {unknown} change the embedding, which bidirlm's encode does "
            f"not reproduce (it pools and normalises: {', '.join(_EMBEDDING_MODULES)}); use sentence-transformers "
            "for this directory"
        )
    pooling = "mean"
    if "Pooling" in types:
        pooling = _pooling_from_st(_read_json(path / types["Pooling"].get("path", _POOLING_DIR) / "config.json"), path)
    bert = _read_json(path / "sentence_bert_config.json") if (path / "sentence_bert_config.json").is_file() else {}
    st = (
        _read_json(path / "config_sentence_transformers.json")
        if (path / "config_sentence_transformers.json").is_file()
        else {}
    )
    return EncoderSettings(
        pooling=pooling,
        normalize="Normalize" in types,
        max_length=int(bert.get("max_seq_length") or 512),
        prompts={k: v for k, v in (st.get("prompts") or {}).items() if v},
        default_prompt_name=st.get("default_prompt_name") or None,
        origin=f"the encoder {path}",
    )


def _run_settings(run: Path) -> EncoderSettings:
    config = run_config(run)
    if config.get("objective") != "contrastive":
        return EncoderSettings()  # no embedding was trained: the defaults
    prompts = prompts_file(run)  # runs from before it was written have none
    return EncoderSettings(
        pooling=config["contrastive"]["pooling"],
        max_length=int(config["data"]["seq_len"]),
        prompts=dict(_read_json(prompts)["prompts"]) if prompts.is_file() else {},
        origin=f"the training run {run}",
    )


def load_encoder(
    path: str | os.PathLike, *, attention: str | None = None, dtype: str = "float32", towers: bool = False
) -> tuple[Transformer, Any, EncoderSettings]:
    """Model (attention as its config says unless `attention`), tokenizer and settings of a directory; the
    text backbone alone unless `towers` (then the vision or audio tower the checkpoint holds, for media).
    Layers are scanned: `encode`'s first call traces and compiles one per batch shape, not all (as fast after)."""
    path = Path(path)
    check_source(path)
    tokenizer = _load_tokenizer(path)
    settings = read_encoder_settings(path)
    mode = {} if attention is None else {"attention": attention}
    runtime = read_runtime(description_dir(path), dtype=dtype, param_dtype=dtype, scan_layers=True, **mode)
    model = from_pretrained(path, runtime=runtime, **({} if towers else {"text_only": True}))
    return model, tokenizer, settings


# --- writing ------------------------------------------------------------------------------------


def write_st_modules(
    out: Path,
    hidden_size: int,
    *,
    pooling: str,
    normalize: bool,
    max_length: int,
    prompts: dict[str, str],
    model_args: dict[str, Any] | None = None,
) -> None:
    """sentence-transformers' files for a `hidden_size`-wide model in `out`; `model_args` go to
    `sentence_bert_config.json` as the Transformer module's model, config and processor arguments
    (`{"trust_remote_code": True}` for a remote-code model)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": _POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": _NORMALIZE_DIR, "type": "sentence_transformers.models.Normalize"}
        )
        (out / _NORMALIZE_DIR).mkdir()
        _write_json(out / _NORMALIZE_DIR / "config.json", {})  # a file, so that no tool drops an empty folder
    _write_json(out / _MODULES, modules)
    (out / _POOLING_DIR).mkdir()
    pooling_config = {"word_embedding_dimension": hidden_size}
    pooling_config.update({flag: flag == _ST_POOLING_FLAGS[pooling] for flag in _ALL_ST_FLAGS})
    pooling_config["include_prompt"] = True
    _write_json(out / _POOLING_DIR / "config.json", pooling_config)
    module_config: dict[str, Any] = {"max_seq_length": max_length, "do_lower_case": False}
    if model_args:
        module_config.update({k: dict(model_args) for k in ("model_args", "config_args", "processor_args")})
    _write_json(out / "sentence_bert_config.json", module_config)
    _write_json(
        out / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "prompts": dict(prompts),
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )


def _record_mask_token(out: Path, tokenizer: Any, family: str) -> None:
    """Keep the mask token MNTP trained with findable: a Qwen3 tokenizer without one gets BidirLM's reserved row."""
    from bidirlm_jax.io.tokenizer import resolve_mask_token, set_mask_token

    if tokenizer.mask_token is not None or not (out / "tokenizer.json").is_file():
        return
    with contextlib.suppress(ConfigError):  # no mask token and no reserved row for one: nothing to record
        set_mask_token(out, resolve_mask_token(tokenizer, "auto", family=family))


def _pad_right(out: Path) -> None:
    """Make the exported tokenizer pad right: position 0 is then the first real token, which is what
    sentence-transformers 5.0-5.4 pool for `cls` whatever the padding side."""
    path = out / "tokenizer_config.json"
    config = _read_json(path) if path.is_file() else {}
    config["padding_side"] = "right"
    _write_json(path, config)


def _offline_tokenizer(out: Path) -> None:
    """`local_files_only` in tokenizer_config.json: loading the export never asks the Hub for files."""
    path = out / "tokenizer_config.json"
    if path.is_file():
        _write_json(path, {**_read_json(path), "local_files_only": True})


def _model_card(
    src: Path,
    model: Transformer,
    pooling: str,
    normalize: bool,
    max_length: int,
    prompts: dict[str, str],
    *,
    released: bool = False,
) -> str:
    cfg = model.config
    config = (
        "the released BidirLM format: load with trust_remote_code=True"
        if released
        else "a native transformers config; no remote code"
    )
    remote = ", trust_remote_code=True" if released else ""
    prompt_lines = "\n".join(f"- `{name}`: `{text!r}`" for name, text in prompts.items()) or "- none"
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags:
- sentence-transformers
- feature-extraction
- bidirlm
---

# {Path(src).resolve().name} (BidirLM encoder)

A bidirectional {cfg.family} encoder exported by bidirlm-jax from `{src}`.

- Embedding: {pooling} pooling over every token (instruction included){", L2-normalised" if normalize else ""};
  {cfg.hidden_size} dimensions; cosine similarity.
- Maximum sequence length: {max_length} tokens.
- Attention: {model.runtime.attention} ({config}).
- Prompts:
{prompt_lines}

Queries of asymmetric tasks (retrieval, reranking) take an instruction, `Instruct: {{instruction}}\\nQuery: `;
documents never do.

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/directory"{remote})
queries = model.encode(["what is a bidirectional encoder?"], prompt_name="query")
documents = model.encode(["An encoder attends to the whole input."])
```

`transformers.AutoModel.from_pretrained` loads the backbone as-is; `bidirlm embed --model DIR` embeds with JAX.
"""


# --- checks and reading -------------------------------------------------------------------------


def _check_export_args(pooling: str, max_length: int, attention: str, dtype: str | None) -> None:
    if pooling not in POOLING_MODES:
        raise ConfigError(f"pooling {pooling!r} is not one of {POOLING_MODES}")
    if max_length < 1:
        raise ConfigError(f"max_length must be positive, got {max_length}")
    if attention not in ATTENTION_MODES:
        raise ConfigError(f"attention {attention!r} is not one of {ATTENTION_MODES}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {DTYPES}")


def check_source(src: Path) -> None:
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory; give an HF model directory or a bidirlm checkpoint")
    if not (description_dir(src) / "config.json").is_file():
        raise CheckpointError(
            f"{src} is not a model directory (no config.json); give an HF model directory (config.json + "
            "safetensors), a merged one, a bidirlm checkpoint (bidirlm convert) or a training run's workdir"
        )


def _load_tokenizer(path: Path) -> Any:
    from bidirlm_jax.io.tokenizer import load_tokenizer  # transformers, imported only when a tokenizer is read

    try:
        return load_tokenizer(description_dir(path))
    except ConfigError as e:
        raise ConfigError(
            f"{e}. An encoder needs its tokenizer: copy the base model's tokenizer files (tokenizer.json, "
            f"tokenizer_config.json, ...) into {path}"
        ) from None


def save_like_source(model, tmp: Path, src: Path, *, dtype: str | None, allow_pickle: bool, **kwargs) -> None:
    """`model` into `tmp` as an encoder export writes it: in `dtype`, else each tensor in the source's own
    precision, with the source's companion files (not its sentence-transformers modules, which it rewrites)."""
    source_dtype, tensor_dtypes = source_dtypes(src, allow_pickle=allow_pickle)
    save_pretrained(
        model,
        tmp,
        dtype=dtype or source_dtype,
        tensor_dtypes=None if dtype else tensor_dtypes,
        overwrite=True,
        extra_files=companion_files(src, owned=ENCODER_MODULES),
        **kwargs,
    )


def source_dtypes(src: Path, *, allow_pickle: bool) -> tuple[str, dict[str, str]]:
    """The source's precision and each tensor's, so that an export keeps them (as `bidirlm convert` does)."""
    if is_checkpoint(src):
        dtype, tensors = recorded_dtypes(src)
        return dtype or "float32", tensors
    tensors = stored_dtypes(src, allow_pickle=allow_pickle)
    return tensors["embed_tokens.weight"], tensors


def _pooling_from_st(config: dict[str, Any], where: Path) -> str:
    if config.get("include_prompt", True) is False:
        raise ConfigError(
            f"{where}: its pooling leaves the prompt's tokens out (include_prompt: false), while bidirlm's encode "
            "pools every token; use sentence-transformers for this directory"
        )
    if "pooling_mode" in config:
        raw = config["pooling_mode"]
        modes = [_ST_MODE_NAMES.get(m, m) for m in ([raw] if isinstance(raw, str) else raw)]
    else:
        modes = [_FLAG_MODES.get(flag, flag) for flag in _ALL_ST_FLAGS if config.get(flag)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ConfigError(
            f"{where}: sentence-transformers pooling {modes} is not one bidirlm can reproduce "
            f"(one of {POOLING_MODES}); re-export the encoder with bidirlm export --pooling"
        )
    return modes[0]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the encoder directory is incomplete, export it again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); export the encoder again") from None


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
