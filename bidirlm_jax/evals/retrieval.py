"""Retrieval on local data in the BEIR layout: nDCG@10, MRR@10 and Recall@100, as BEIR and MTEB score them.

A BEIR directory holds `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`) and
`qrels/{split}.tsv` (header `query-id corpus-id score`). Documents are `title + " " + text` (MTEB's join),
never instructed; queries carry the instruction. Ranking is by cosine similarity, ties broken by document id,
descending (trec_eval's order, which pytrec_eval and MTEB share). Metrics follow pytrec_eval: graded gain
`rel` with a log2 discount and the ideal DCG from every judged document; relevant means `rel > 0`; the mean is
over the queries that have at least one relevant document (MTEB drops the others).

Documents and queries may be images or clips (for a model with towers): a line's `image` or `audio` field is
a path relative to the file, with an optional `text` (and `title`) beside it, the composed input embedded
under the released protocol by default (`embed.compose`: per-modality embeddings summed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bidirlm_jax.data.records import ROWS, read_file, read_lines
from bidirlm_jax.embed.compose import MEDIA, encode_items, item_modalities
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.transformer import Transformer

NDCG_K, MRR_K, RECALL_K = 10, 10, 100
_LAYOUT = (
    "corpus.jsonl (_id, title, text), queries.jsonl (_id, text) and qrels/SPLIT.tsv (query-id, corpus-id, score); "
    "a line may hold an image or audio path (relative to the file) instead of or beside its text"
)


@dataclass(frozen=True)
class RetrievalData:
    """A BEIR split: documents as (title, text), queries, and graded judgments `qrels[query][doc] = rel`."""

    corpus: dict[str, tuple[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    corpus_media: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # id -> {"image"/"audio": path}
    query_media: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    def evaluated_queries(self) -> list[str]:
        """The judged queries with at least one relevant document, in qrels order."""
        return [q for q, rels in self.qrels.items() if q in self.queries and any(r > 0 for r in rels.values())]

    def document(self, doc_id: str) -> str | dict[str, str]:
        """What the encoder reads for a document: its text, or its media with the text beside them."""
        return _item(document_text(*self.corpus[doc_id]), self.corpus_media.get(doc_id))

    def query(self, query_id: str) -> str | dict[str, str]:
        return _item(self.queries[query_id], self.query_media.get(query_id))

    def modalities(self) -> tuple[list[str], list[str]]:
        """The modalities of the evaluated queries and of the documents, each in the order text, image, audio."""
        found = [
            set().union(*(item_modalities(get(i)) for i in ids))
            for get, ids in ((self.query, self.evaluated_queries()), (self.document, self.corpus))
        ]
        return tuple([m for m in ("text", *MEDIA) if m in kinds] for kinds in found)


def _item(text: str, media: dict[str, str] | None) -> str | dict[str, str]:
    return {**media, **({"text": text} if text else {})} if media else text


def document_text(title: str, text: str) -> str:
    """What the encoder reads for a document (MTEB's join)."""
    return (title + " " + text).strip() if title else text.strip()


def load_beir(path: str | os.PathLike, split: str = "test") -> RetrievalData:
    """Read a BEIR directory's corpus, queries and the qrels of `split`."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; give a BEIR directory with {_LAYOUT}")
    corpus_rows, query_rows = _read_jsonl(path / "corpus.jsonl"), _read_jsonl(path / "queries.jsonl")
    corpus = {doc_id: (row.get("title") or "", row.get("text") or "") for doc_id, row in corpus_rows}
    queries = {query_id: row.get("text") or "" for query_id, row in query_rows}
    qrels = _read_qrels(path / "qrels" / f"{split}.tsv")
    data = RetrievalData(corpus, queries, qrels, _media(corpus_rows, path), _media(query_rows, path))
    if not corpus or not data.evaluated_queries():
        raise ConfigError(
            f"{path}: nothing to evaluate ({len(corpus)} documents, {len(data.evaluated_queries())} queries with a "
            f"relevant document in qrels/{split}.tsv and queries.jsonl)"
        )
    return data


def rank(
    query_embeddings: np.ndarray, doc_embeddings: np.ndarray, doc_ids: list[str], top_k: int = RECALL_K
) -> list[dict[str, float]]:
    """Each query's `top_k` documents by cosine similarity, `{doc_id: score}` in rank order (ties: id descending)."""
    q = _unit(query_embeddings)
    d = _unit(doc_embeddings)
    k = min(top_k, len(doc_ids))
    runs = []
    for start in range(0, len(q), 256):  # bounded memory: 256 x num_docs scores at a time
        scores = q[start : start + 256] @ d.T
        for row in scores:
            threshold = np.partition(row, len(row) - k)[len(row) - k]
            candidates = np.flatnonzero(row >= threshold)  # every document tied with the k-th too
            order = sorted(candidates, key=lambda i: (row[i], doc_ids[i]), reverse=True)[:k]
            runs.append({doc_ids[i]: float(row[i]) for i in order})
    return runs


def retrieval_metrics(
    run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]]
) -> dict[str, float]:
    """Mean nDCG@10, MRR@10 and Recall@100 of a run (`{query: {doc: score}}`) over its judged queries."""
    per_query = {"ndcg_at_10": [], "mrr_at_10": [], "recall_at_100": []}
    for query_id, scores in run.items():
        rels = qrels.get(query_id, {})
        relevant = {doc for doc, rel in rels.items() if rel > 0}
        if not relevant:
            continue
        ranked = [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]
        gains = [max(rels.get(doc, 0), 0) for doc in ranked[:NDCG_K]]
        ideal = sorted((rel for rel in rels.values() if rel > 0), reverse=True)[:NDCG_K]
        per_query["ndcg_at_10"].append(_dcg(gains) / _dcg(ideal))
        first = next((i for i, doc in enumerate(ranked[:MRR_K]) if doc in relevant), None)
        per_query["mrr_at_10"].append(0.0 if first is None else 1.0 / (first + 1))
        per_query["recall_at_100"].append(len(relevant & set(ranked[:RECALL_K])) / len(relevant))
    if not per_query["ndcg_at_10"]:
        raise ConfigError("no query of the run has a relevant document in the qrels; check the query ids")
    metrics = {name: float(np.mean(values)) for name, values in per_query.items()}
    return {**metrics, "num_queries": len(per_query["ndcg_at_10"])}


def evaluate_retrieval(
    model: Transformer,
    tokenizer: Any,
    data: RetrievalData | str | os.PathLike,
    *,
    instruction: str | None = None,
    split: str = "test",
    pooling: str = "mean",
    batch_size: int = 32,
    max_length: int = 512,
    progress: bool | None = None,
    protocol: str = "sum",
) -> dict[str, float]:
    """Encode a BEIR split (instruction on query texts only; composed inputs under `protocol`), rank the corpus
    for each query and score the ranking. For media, `tokenizer` may be the model's `MediaProcessor`."""
    if not isinstance(data, RetrievalData):
        data = load_beir(data, split)
    doc_ids = list(data.corpus)
    query_ids = data.evaluated_queries()
    kw = dict(pooling=pooling, batch_size=batch_size, max_length=max_length, progress=progress, protocol=protocol)
    docs = encode_items(model, tokenizer, [data.document(d) for d in doc_ids], **kw)
    queries = encode_items(model, tokenizer, [data.query(q) for q in query_ids], instruction=instruction, **kw)
    run = dict(zip(query_ids, rank(queries, docs, doc_ids, RECALL_K)))
    return {**retrieval_metrics(run, data.qrels), "num_documents": len(doc_ids)}


def _dcg(gains: list[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(id, record) of each line, every field of the BEIR row contract (`data.records.ROWS["beir"]`) checked,
    so that bad data fails before a model loads."""
    if not path.is_file():
        raise ConfigError(f"{path} is missing; a BEIR directory holds {_LAYOUT}")
    rows = []
    for where, row in read_file(path):
        missing = [f.key for f in ROWS["beir"] if f.required and (not isinstance(row, dict) or f.key not in row)]
        if not missing and not any(k in row for k in ("text", *MEDIA)):
            missing = ["text"]
        if missing:
            raise ConfigError(f"{where}: missing field(s) {missing}; a BEIR directory holds {_LAYOUT}")
        for field in ROWS["beir"]:
            if field.key in row and not field.accepts(row[field.key]):
                raise ConfigError(
                    f"{where}: {field.key!r} holds {json.dumps(row[field.key])[:40]}, not {field.expected}; fix or "
                    "drop the line"
                )
        for key in MEDIA:
            if key in row and not (path.parent / row[key]).is_file():
                raise ConfigError(
                    f"{where}: {key} file {path.parent / row[key]} does not exist (paths are relative to the file)"
                )
        rows.append((str(row["_id"]), row))
    return rows


def _media(rows: list[tuple[str, dict[str, Any]]], root: Path) -> dict[str, dict[str, str]]:
    """id -> {"image"/"audio": absolute path} of the rows that hold media."""
    return {
        i: {k: str((root / row[k]).resolve()) for k in MEDIA if k in row} for i, row in rows if row.keys() & set(MEDIA)
    }


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    if not path.is_file():
        raise ConfigError(f"{path} is missing; a BEIR directory holds {_LAYOUT}")
    qrels: dict[str, dict[str, int]] = {}
    for lineno, (where, line) in enumerate(read_lines(path), 1):
        fields = line.split("\t")
        if not line.strip() or (lineno == 1 and fields[0] == "query-id"):
            continue
        try:
            query_id, doc_id, rel = fields[0], fields[1], int(float(fields[2]))
        except (IndexError, ValueError):
            raise ConfigError(
                f"{where}: expected 'query-id<TAB>corpus-id<TAB>score' with an integer score, got {line!r}"
            ) from None
        qrels.setdefault(query_id, {})[doc_id] = rel
    return qrels
