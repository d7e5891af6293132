"""The BidirLM-Omni encoder directory, as the release lays it out: what loads where BidirLM-Omni loads.

`export_omni` writes an Omni model (a released directory read back, a composition from `bidirlm merge`,
a checkpoint) as `BidirLMOmniModel`'s keys (`language_model.`, `visual.`, `audio_tower.`, every declared
DeepStack merger carried) with a `bidirlm_omni` config.json whose `auto_map` names the released remote
code on the hub (no code file is written: loading needs `trust_remote_code` and the hub), the source's
tokenizer, chat template and processors, and sentence-transformers' modules (mean pooling over every
token, template and media included, then L2 normalisation; the Transformer module loads the remote code).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.atomic import atomic_directory, check_destination
from bidirlm_jax.io.hf import from_pretrained
from bidirlm_jax.io.hf_config import read_config_dict
from bidirlm_jax.io.hf_config_omni import is_omni
from bidirlm_jax.io.run import description_dir
from bidirlm_jax.io.sentence_transformers import check_source, save_like_source, write_st_modules
from bidirlm_jax.models.towers.omni.model import Omni
from bidirlm_jax.paths import user_path

OMNI_MAX_LENGTH = 1024  # the released mteb wrapper's text length (omni notes §6)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def is_omni_dir(path: str | os.PathLike) -> bool:
    """Whether `path` (an HF directory, a checkpoint, a run) describes a BidirLM-Omni model."""
    return is_omni(read_config_dict(description_dir(user_path(path))))


def export_omni(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    max_length: int = OMNI_MAX_LENGTH,
    prompts: dict[str, str] | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Write the Omni model in `src` (with its tokenizer and processors) as a BidirLM-Omni directory `dst`
    (see the module docstring), each tensor in its stored precision unless `dtype`; atomically."""
    src = user_path(src)
    check_source(src)
    if not is_omni_dir(src):
        raise ConfigError(f"{src} is not a BidirLM-Omni model (its config.json's model_type is not bidirlm_omni)")
    if max_length < 1:
        raise ConfigError(f"max_length must be positive, got {max_length}")
    check_destination(dst, overwrite=overwrite)
    model = from_pretrained(src, dtype="float32", allow_pickle=allow_pickle)
    if not isinstance(model, Omni):
        raise ConfigError(f"{src} did not load as an Omni model")
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        save_like_source(model, tmp, src, dtype=dtype, allow_pickle=allow_pickle)
        write_st_modules(
            tmp,
            model.config.text.hidden_size,
            pooling="mean",
            normalize=True,
            max_length=max_length,
            prompts=prompts or {},
            model_args={"trust_remote_code": True},
        )
    return Path(dst)


def read_chat_template(path: str | os.PathLike) -> str | None:
    """The chat template a model directory ships (`chat_template.jinja`, `chat_template.json` or the
    tokenizer config's `chat_template`), None when it has none: the template its prompts are rendered in."""
    where = description_dir(user_path(path))
    jinja, as_json = (where / name for name in CHAT_TEMPLATE_FILES)
    if jinja.is_file():
        return jinja.read_text()
    for file in (as_json, where / "tokenizer_config.json"):
        if file.is_file():
            template = _json(file).get("chat_template")
            if template is not None:
                return template
    return None


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return value
