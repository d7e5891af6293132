"""Packed text rows, shared by the causal-LM and MNTP objectives: a corpus (or a weighted mixture of
corpora) tokenised with the run's tokenizer and packed into `data.seq_len` rows (`data.packing`).

`data.source`: `text` (`data.path`: files, directories, globs, a `bidirlm tokenize` output or `hf:NAME`)
or `stdlib` (the Python standard library's docstrings, offline). `data.mixture`
(`"NAME:WEIGHT:PATH;..."`) replaces `data.path` with weighted sources in exact token proportions.
"""

from __future__ import annotations

import dataclasses

import grain
from ml_collections import ConfigDict

from bidirlm_jax.data.corpus_shards import Corpus, load_corpus, tokenize_documents
from bidirlm_jax.data.mixture import MixtureSource, mixture_dataset, parse_mixture
from bidirlm_jax.data.packing import packed_dataset
from bidirlm_jax.data.stdlib_text import stdlib_docstrings
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.train.objectives.base import check_data_path

SOURCES = ("text", "stdlib")


@dataclasses.dataclass(frozen=True)
class PackedText:
    rows: grain.MapDataset  # global packed rows (mixture rows carry `source`)
    source_names: list[str]  # the mixture's source names, in `source` order; empty without a mixture
    special_ids: list[int]  # ids never masked (BERT-style random replacements avoid them too)


def _corpus(data: ConfigDict, path: str, tokenizer) -> Corpus:
    if data.source == "stdlib":
        return tokenize_documents([doc for _, doc in stdlib_docstrings()], tokenizer)
    check_data_path(data)
    return load_corpus(path, tokenizer, text_field=data.text_field)


def packed_text(data: ConfigDict, tokenizer, vocab_size: int) -> PackedText:
    """The packed rows `data` describes, every corpus checked against the model's vocabulary."""
    if data.source not in SOURCES:
        raise ConfigError(f"data.source={data.source!r} is not one of {SOURCES} for text objectives")
    mixture = parse_mixture(data.mixture)
    corpora = [(name, weight, _corpus(data, path, tokenizer)) for name, weight, path in mixture] or [
        ("", 1.0, _corpus(data, data.path, tokenizer))
    ]
    for _, _, corpus in corpora:
        corpus.check_vocab(vocab_size)
    packed = [packed_dataset(c, seq_len=data.seq_len, seed=data.seed) for _, _, c in corpora]
    if mixture:
        rows = mixture_dataset([MixtureSource(n, w, r) for (n, w, _), r in zip(corpora, packed)])
    else:
        rows = packed[0]
    return PackedText(
        rows=rows,
        source_names=[name for name, _, _ in corpora] if mixture else [],
        special_ids=sorted(set().union(*(c.special_ids for _, _, c in corpora))),
    )
