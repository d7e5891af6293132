"""Tokenised corpora: documents as token ids, in memory or as memory-mapped shards on disk.

`Corpus` is what training reads, whichever way it was made: `tokenize_documents` tokenises a small source
on the fly; `tokenize_corpus` (`bidirlm tokenize SRC OUT --tokenizer DIR`) tokenises a large one once, in
several processes, into `tokens-NNNNN.npy` (uint32 ids of the documents, concatenated), `docs-NNNNN.npy`
(int64 document offsets into them, starting at 0) and a `corpus.json` manifest (`data.manifest`: the
tokenizer's record and the largest id, recorded once so that no start rescans gigabytes). Documents are
encoded as the tokenizer encodes them with `add_special_tokens=True` (BOS/EOS as it adds them); a document
of special tokens only (an empty text) is skipped and counted.

A run works in a hidden `.OUT.partial` directory: each finished shard is recorded by a marker written
after its arrays, so an interrupted run resumes after its last finished shard (a shard ends with the
document that fills it, hence at the same place on every run); the result is renamed into place only
when complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from bidirlm_jax.data.corpus_encoder import Encoded, Encoder, chunks, encoding
from bidirlm_jax.data.manifest import (
    FORMAT,
    MANIFEST,
    backend_sha256,
    check_same_encoding,
    read_manifest,
    tokenizer_record,
)
from bidirlm_jax.data.sources import HUB_PREFIX, iter_documents, source_files
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.atomic import atomic_directory, check_destination, write_atomically
from bidirlm_jax.paths import user_path

if TYPE_CHECKING:  # transformers is imported only where a tokenizer is loaded, so tokenising workers start fast
    from transformers import PreTrainedTokenizerBase

_SETTINGS = "settings.json"


class Corpus:
    """Documents as token-id arrays, from in-memory arrays or memory-mapped shards, read identically.

    Each shard is `(tokens, offsets)`: the ids of its documents concatenated, and `num_docs + 1` offsets.
    `tokenizer` is the manifest's tokenizer record (`special_ids`, `pad_id`, `vocab_size`, ...).
    """

    def __init__(
        self,
        shards: Sequence[tuple[np.ndarray, np.ndarray]],
        *,
        tokenizer: dict[str, Any],
        max_token_id: int,
        skipped_docs: int = 0,
        path: Path | None = None,
    ):
        self._tokens = [tokens for tokens, _ in shards]
        self._offsets = [offsets for _, offsets in shards]
        self._first_doc = np.cumsum([0] + [len(offsets) - 1 for offsets in self._offsets])
        self.lengths = np.concatenate([np.diff(offsets) for offsets in self._offsets]).astype(np.int64)
        self.tokenizer, self.max_token_id, self.skipped_docs, self.path = tokenizer, max_token_id, skipped_docs, path

    @property
    def num_docs(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids that are never masked (the tokenizer's special tokens)."""
        return tuple(self.tokenizer["special_ids"])

    @property
    def pad_id(self) -> int:
        """The id that fills padding (the tokenizer's pad token, else 0); padding is marked by segment 0 anyway."""
        return self.tokenizer["pad_id"] if self.tokenizer["pad_id"] is not None else 0

    def document(self, index: int) -> np.ndarray:
        """The token ids of document `index` (a view into its shard)."""
        if not 0 <= index < self.num_docs:
            raise IndexError(f"document {index} of a corpus of {self.num_docs}")
        shard = int(np.searchsorted(self._first_doc, index, side="right")) - 1
        offsets, local = self._offsets[shard], index - self._first_doc[shard]
        return self._tokens[shard][offsets[local] : offsets[local + 1]]

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse a corpus holding ids beyond the model's `vocab_size` embedding rows."""
        if self.max_token_id >= vocab_size:
            raise ConfigError(
                f"the corpus {self.path or ''} holds token id {self.max_token_id} but the model's embedding has "
                f"{vocab_size} rows; tokenise it with the checkpoint's own tokenizer"
            )

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Refuse a pre-tokenised corpus whose tokenizer encodes text differently from the model's."""
        check_same_encoding(self.tokenizer, tokenizer, self.path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Corpus:
        """Open a directory `bidirlm tokenize` wrote; the shards are memory-mapped, never read whole."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise ConfigError(f"{path} is not a tokenised corpus (no {MANIFEST}); write one with bidirlm tokenize")
        manifest = read_manifest(path)
        shards = []
        for shard in manifest["shards"]:
            try:
                tokens, offsets = (np.load(path / shard[k], mmap_mode="r") for k in ("tokens", "docs"))
            except (OSError, ValueError) as e:  # missing, truncated, not an array file
                raise ConfigError(f"cannot read a shard of {path / MANIFEST} ({e}); re-run bidirlm tokenize") from None
            if (
                tokens.dtype != np.uint32
                or tokens.shape != (shard["num_tokens"],)
                or offsets.shape != (shard["num_docs"] + 1,)
            ):
                raise ConfigError(f"{path / shard['tokens']} does not match {MANIFEST}; re-run bidirlm tokenize")
            shards.append((tokens, offsets))
        return cls(
            shards,
            tokenizer=manifest["tokenizer"],
            max_token_id=manifest["max_token_id"],
            skipped_docs=manifest["skipped_docs"],
            path=path,
        )

    def __reduce__(self):
        # A memory-mapped corpus travels to worker processes as its path, not as a copy of its tokens.
        if self.path is None:
            return super().__reduce__()
        return _reopen, (self.path, self.tokenizer)


def _reopen(path: Path, tokenizer: dict[str, Any]) -> Corpus:
    corpus = Corpus.load(path)
    corpus.tokenizer = tokenizer
    return corpus


def tokenize_documents(
    documents: Iterable[str], tokenizer: PreTrainedTokenizerBase, *, chunk_docs: int = 1024
) -> Corpus:
    """Tokenise `documents` in this process into an in-memory `Corpus`."""
    encoder = Encoder.of(tokenizer)
    parts = [encoder(chunk) for chunk in chunks(documents, chunk_docs)]
    tokens, offsets = _concatenate(parts)
    skipped = sum(p.num_read for p in parts) - (len(offsets) - 1)
    if len(offsets) == 1:
        raise ConfigError(
            f"every document of the corpus holds special tokens only ({skipped} skipped); nothing to train on"
        )
    return Corpus(
        [(tokens, offsets)],
        tokenizer=tokenizer_record(tokenizer),
        max_token_id=int(tokens.max()),
        skipped_docs=skipped,
    )


def load_corpus(
    path: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, *, text_field: str = "text", split: str = "train"
) -> Corpus:
    """The corpus `data.path` names: a `bidirlm tokenize` directory (memory-mapped), else text tokenised now."""
    if (user_path(path) / MANIFEST).is_file():
        corpus = Corpus.load(user_path(path))
        corpus.check_tokenizer(tokenizer)
        # The same ids, but which are special (never masked) is the run tokenizer's say, as on the fly.
        corpus.tokenizer = tokenizer_record(tokenizer)
        return corpus
    return tokenize_documents(iter_documents(path, text_field=text_field, split=split), tokenizer)


def tokenize_corpus(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike,
    *,
    text_field: str = "text",
    split: str = "train",
    num_workers: int = 1,
    shard_tokens: int = 1 << 28,
    chunk_docs: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Tokenise the source `src` into shards of about `shard_tokens` tokens in `out_dir` (see the module doc).

    `tokenizer` is a tokenizer or its directory; `num_workers` processes tokenise chunks of `chunk_docs`
    documents, results kept in source order. Re-running an interrupted call resumes it.
    """
    out = check_destination(out_dir, overwrite=overwrite)
    if isinstance(tokenizer, (str, os.PathLike)):
        from bidirlm_jax.io.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    record = {**tokenizer_record(tokenizer), "backend_sha256": backend_sha256(tokenizer)}
    encoder_args = Encoder.args(tokenizer)
    work = out.parent / f".{out.name}.partial"
    settings = {
        "source": _fingerprint(src),
        "text_field": text_field,
        "split": split,
        "shard_tokens": shard_tokens,
        "tokenizer": record,
        "tokenizer_sha256": hashlib.sha256(encoder_args[0].encode()).hexdigest(),
    }
    shards = _finished_shards(work, settings)
    read = shards[-1]["source_end"] if shards else 0
    documents = itertools.islice(iter_documents(src, text_field=text_field, split=split), read, None)
    buffer: list[Encoded] = []
    bar = tqdm(desc=f"tokenize {Path(src).name}", unit="doc", initial=read, disable=not progress)
    with encoding(encoder_args, num_workers) as encode, bar:
        for encoded in encode(chunks(documents, chunk_docs)):
            bar.update(encoded.num_read)
            # A shard ends with the document that fills it, so shards end at the same documents on every run.
            filled = sum(len(p.tokens) for p in buffer) + np.cumsum(encoded.lengths) >= shard_tokens
            while filled.any():
                head, encoded = encoded.split(int(np.argmax(filled)) + 1)
                shards.append(_write_shard(work, settings, len(shards), [*buffer, head], read))
                read, buffer = shards[-1]["source_end"], []
                filled = np.cumsum(encoded.lengths) >= shard_tokens
                bar.set_postfix(shards=len(shards))
            buffer.append(encoded)
    if any(len(p.lengths) for p in buffer):
        shards.append(_write_shard(work, settings, len(shards), buffer, read))
        buffer = []
    skipped = sum(s["source_end"] - s["source_start"] - s["num_docs"] for s in shards) + sum(p.num_read for p in buffer)
    if not shards:
        raise ConfigError(f"every document of {src} holds special tokens only ({skipped} skipped); nothing written")
    manifest = {
        "format": FORMAT,
        "source": os.fspath(src),
        "tokenizer": record,
        "dtype": "uint32",
        "num_docs": sum(s["num_docs"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "max_token_id": max(s["max_token_id"] for s in shards),
        "skipped_docs": skipped,
        "shards": [{k: s[k] for k in ("tokens", "docs", "num_docs", "num_tokens")} for s in shards],
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for shard in shards:
            for name in (shard["tokens"], shard["docs"]):
                os.replace(work / name, tmp / name)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(work)
    return out


def _fingerprint(src: str | os.PathLike) -> list:
    """What identifies the source's content cheaply: hub name, or each file's path, size and mtime."""
    if os.fspath(src).startswith(HUB_PREFIX):
        return [os.fspath(src)]
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in source_files(src)]


def _finished_shards(work: Path, settings: dict) -> list[dict]:
    """The shards an earlier, interrupted run of the same job finished; anything else in `work` is discarded."""
    if not work.is_dir():
        return []
    if not (work / _SETTINGS).is_file() or json.loads((work / _SETTINGS).read_text()) != settings:
        shutil.rmtree(work)  # another source, tokenizer or setting: start over
        return []
    shards = []
    while (work / f"shard-{len(shards):05d}.json").is_file():
        shards.append(json.loads((work / f"shard-{len(shards):05d}.json").read_text()))
    keep = {_SETTINGS} | {f"{kind}-{i:05d}.{ext}" for i in range(len(shards)) for kind, ext in _SHARD_FILES}
    for stale in work.iterdir():
        if stale.name not in keep:
            stale.unlink()
    return shards


_SHARD_FILES = (("tokens", "npy"), ("docs", "npy"), ("shard", "json"))


def _write_shard(work: Path, settings: dict, index: int, parts: list[Encoded], source_start: int) -> dict:
    """Write one shard's arrays, then its marker (each through a temporary file renamed into place)."""
    if not work.is_dir():
        work.mkdir(parents=True)
        write_atomically(work / _SETTINGS, json.dumps(settings))
    tokens, offsets = _concatenate(parts)
    record = {
        "tokens": f"tokens-{index:05d}.npy",
        "docs": f"docs-{index:05d}.npy",
        "num_docs": len(offsets) - 1,
        "num_tokens": len(tokens),
        "max_token_id": int(tokens.max()),
        "source_start": source_start,
        "source_end": source_start + sum(p.num_read for p in parts),
    }
    write_atomically(work / record["tokens"], lambda f: np.save(f, tokens))
    write_atomically(work / record["docs"], lambda f: np.save(f, offsets))
    write_atomically(work / f"shard-{index:05d}.json", json.dumps(record))
    return record


def _concatenate(parts: list[Encoded]) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.concatenate([np.zeros(0, np.uint32)] + [p.tokens for p in parts])
    lengths = np.concatenate([np.zeros(0, np.int64)] + [p.lengths for p in parts])
    return tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
