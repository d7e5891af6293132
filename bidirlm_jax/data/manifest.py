"""The `corpus.json` manifest of a `bidirlm tokenize` output: what it records of the tokenizer, the check that
a run's tokenizer encodes text as that one did, and reading the manifest back checked, so that a truncated
or hand-edited one is an error naming the file (and line), not a traceback from deep inside training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bidirlm_jax.errors import ConfigError

if TYPE_CHECKING:  # transformers is imported only where a tokenizer is loaded, so tokenising workers start fast
    from transformers import PreTrainedTokenizerBase

MANIFEST = "corpus.json"
FORMAT = "bidirlm-tokens/1"
_REDO = "re-run bidirlm tokenize (or copy the corpus again)"

# key -> the JSON type(s) it holds; the manifest's top level, each shard, the tokenizer record
_TOP = {"tokenizer": dict, "max_token_id": int, "skipped_docs": int, "shards": list}
_SHARD = {"tokens": str, "docs": str, "num_docs": int, "num_tokens": int}
_TOKENIZER = {"vocab_size": int, "special_ids": list, "pad_id": (int, type(None))}


def tokenizer_record(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The tokenizer as a corpus records it: size, special ids (never masked) and the core tokens' ids."""
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "vocab_size": len(tokenizer),
        "special_ids": sorted(int(i) for i in tokenizer.all_special_ids),
        **{f"{name}_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos", "mask")},
    }


def backend_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the ids a text becomes: the backend (normaliser, pre-tokeniser, model, added
    tokens, post-processor) without its runtime truncation and padding, and without the added tokens'
    `special` flags, which only say how a token decodes (and flip when a mask token is recorded)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend.pop("truncation", None)
    backend.pop("padding", None)
    for token in backend.get("added_tokens") or []:
        token.pop("special", None)
    return hashlib.sha256(json.dumps(backend, sort_keys=True).encode()).hexdigest()


def check_same_encoding(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, corpus: Path | None) -> None:
    """Refuse a corpus whose recorded tokenizer encodes text differently from `tokenizer`.

    Compared: the vocabulary size and `backend_sha256`, not the special ids, which recording a mask token
    (an MNTP or merged checkpoint's tokenizer) extends without changing any id.
    """
    theirs = tokenizer_record(tokenizer)
    fix = "re-run bidirlm tokenize with the checkpoint's tokenizer"
    if "backend_sha256" in record:
        compared = (
            {"vocab_size": record["vocab_size"], "backend_sha256": record["backend_sha256"][:12]},
            {"vocab_size": theirs["vocab_size"], "backend_sha256": backend_sha256(tokenizer)[:12]},
        )
    else:  # a corpus written before the hash was recorded: its special ids, the mask tokens aside
        masks = {record.get("mask_id"), theirs["mask_id"]}
        compared = tuple(
            {"vocab_size": r["vocab_size"], "special_ids": [i for i in r["special_ids"] if i not in masks]}
            for r in (record, theirs)
        )
        fix += " (this corpus predates tokenizer hashes)"
    if compared[0] != compared[1]:
        raise ConfigError(
            f"the corpus {corpus or ''} was tokenised with another tokenizer ({compared[0]}, the model's: "
            f"{compared[1]}); {fix}"
        )


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the corpus directory `path`, every field the reader uses checked for presence and type."""
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}:{e.lineno}: not valid JSON ({e.msg}; truncated?); {_REDO}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: not UTF-8 text ({e.reason}); {_REDO}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{file} is not a {FORMAT} manifest; {_REDO}")
    _check(manifest, _TOP, file, "")
    _check(manifest["tokenizer"], _TOKENIZER, file, "tokenizer.")
    if not all(type(i) is int for i in manifest["tokenizer"]["special_ids"]):
        raise ConfigError(f"{file}: tokenizer.special_ids holds something other than integers; {_REDO}")
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            raise ConfigError(f"{file}: shards[{i}] is not an object; {_REDO}")
        _check(shard, _SHARD, file, f"shards[{i}].")
    if not manifest["shards"]:
        raise ConfigError(f"{file} lists no shards; {_REDO}")
    return manifest


def _check(record: dict, schema: dict[str, type | tuple[type, ...]], file: Path, where: str) -> None:
    for key, types in schema.items():
        if key not in record:
            raise ConfigError(f"{file}: {where}{key} is missing (an incomplete manifest); {_REDO}")
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConfigError(f"{file}: {where}{key} holds {json.dumps(value)[:40]}, not {_names(types)}; {_REDO}")


def _names(types: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", int: "an integer", str: "a string", type(None): "null"}
    return " or ".join(names[t] for t in (types if isinstance(types, tuple) else (types,)))
