"""The tiny pipeline's corpus: the docstrings of Python's standard library, read at run time from the
interpreter. Whole packages are held out (about a fifth, chosen by a hash of the package name, so every run
holds out the same ones) for evaluation; the rest is training text and the contrastive pairs (a docstring's
summary line <-> its body, hard negatives from the same module).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Any

HELD_OUT_BUCKETS = 5  # a package is held out when crc32(name) % 5 == 0: about a fifth of the packages
INSTRUCTIONS = {
    "members": ("Given the summary line of a Python function's or class's docstring, retrieve the rest of it", False),
    "summaries": ("Given a one-line summary of a Python module, retrieve its documentation", False),
    "halves": ("Retrieve semantically similar text", True),
}
EVAL_INSTRUCTION = INSTRUCTIONS["members"][0]  # held-out queries are summary lines, as in `members`


@dataclasses.dataclass(frozen=True)
class Doc:
    module: str
    name: str  # "" for the module's own docstring, else the public class or function it documents
    text: str


def held_out(module: str) -> bool:
    """Whether `module`'s whole top-level package is held out for evaluation (deterministic)."""
    return zlib.crc32(module.split(".")[0].encode()) % HELD_OUT_BUCKETS == 0


def stdlib_documents() -> list[Doc]:
    """Every module docstring of the standard library (`data.stdlib_text.stdlib_docstrings`) and the docstrings of
    the public classes and functions defined in those modules, in module order (a few seconds of parsing)."""
    from bidirlm_jax.data.stdlib_text import stdlib_docstrings

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for module, text in stdlib_docstrings():
        docs.append(Doc(module, "", text))
        docs += [Doc(module, name, doc) for name, doc in _member_docstrings(_module_path(root, module))]
    return docs


def _module_path(root: Path, module: str) -> Path:
    path = root.joinpath(*module.split("."))
    return path / "__init__.py" if (path / "__init__.py").is_file() else path.with_suffix(".py")


def _member_docstrings(path: Path) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return []
    members = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                members.append((node.name, doc))
    return members


def summary_pairs(docs: list[Doc], *, min_body: int = 50) -> list[tuple[Doc, str, str]]:
    """(doc, summary line, body) of the docstrings that have both, with a summary of at least three words and
    no summary or body shared with another docstring (an ambiguous query has no single answer)."""
    rows = []
    for doc in docs:
        summary, _, body = doc.text.partition("\n")
        summary, body = summary.strip(), body.strip()
        if len(summary.split()) >= 3 and any(c.isalpha() for c in summary) and len(body) >= min_body:
            rows.append((doc, summary, body))
    seen: dict[str, int] = {}
    for _, summary, body in rows:
        seen[summary] = seen.get(summary, 0) + 1
        seen[body] = seen.get(body, 0) + 1
    return [row for row in rows if seen[row[1]] == 1 and seen[row[2]] == 1]


def _nearest(index: int, count: int, k: int) -> list[int]:
    """The `k` indices closest to `index` in `[0, count)`, alternating after and before it."""
    out, step = [], 1
    while len(out) < k and step < count:
        for j in (index + step, index - step):
            if 0 <= j < count and len(out) < k:
                out.append(j)
        step += 1
    return out


@dataclasses.dataclass
class Corpus:
    """The demo's data, split by package: training text and pairs, and the held-out retrieval set."""

    train_texts: list[str]
    pairs: dict[str, list[dict[str, Any]]]  # dataset -> records {"query", "positive", "negatives"}
    eval_data: Any  # evals.retrieval.RetrievalData
    held_out_packages: list[str]


def build_corpus(*, num_negatives: int, max_eval_queries: int) -> Corpus:
    from bidirlm_jax.data.stdlib_text import stdlib_pairs
    from bidirlm_jax.evals.retrieval import RetrievalData

    docs = stdlib_documents()
    train = [d for d in docs if not held_out(d.module)]
    test = [d for d in docs if held_out(d.module)]
    members = [(s, b) for d, s, b in summary_pairs(train) if d.name]
    pairs = {
        "members": [
            {"query": s, "positive": b, "negatives": [members[j][1] for j in _nearest(i, len(members), num_negatives)]}
            for i, (s, b) in enumerate(members)
        ]
    }
    datasets, _ = stdlib_pairs(num_negatives=num_negatives, exclude=held_out)  # module docstrings: summaries, halves
    for ds in datasets:  # modules sharing one docstring (importlib._bootstrap*) would be each other's negatives
        counts: dict[str, int] = {}
        for p in ds.positives:
            counts[p] = counts.get(p, 0) + 1
        pairs[ds.name] = [
            {"query": q, "positive": p, "negatives": n}
            for q, p, n in zip(ds.queries, ds.positives, ds.negatives)
            if counts[p] == 1 and p not in n
        ]
    held = summary_pairs(test)
    if len(held) > max_eval_queries:  # an even spread over the held-out modules, the same every run
        held = [held[round(i * len(held) / max_eval_queries)] for i in range(max_eval_queries)]
    eval_data = RetrievalData(
        corpus={f"d{i}": ("", body) for i, (_, _, body) in enumerate(held)},
        queries={f"q{i}": summary for i, (_, summary, _) in enumerate(held)},
        qrels={f"q{i}": {f"d{i}": 1} for i in range(len(held))},
    )
    return Corpus(
        train_texts=[d.text for d in train],
        pairs=pairs,
        eval_data=eval_data,
        held_out_packages=sorted({d.module.split(".")[0] for d in test}),
    )


def write_domains(
    out_dir: str | os.PathLike, *, max_train: int | None = None, max_held_out: int | None = None
) -> dict[str, dict[str, Path]]:
    """Two text domains every machine has, split by package as the demo splits (`held_out`), as `.jsonl` files
    (`{"text": ...}` per line) for MNTP mixtures and held-out evaluation (`evals.held_out.data`): `english`, the
    docstrings (`stdlib_documents`), and `code`, the functions and classes (`data.stdlib_text.stdlib_code`).
    Returns `{domain: {"train": path, "held_out": path}}`; `max_*` keep an even spread of that many documents."""
    from bidirlm_jax.data.stdlib_text import stdlib_code

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = {
        "english": [(d.module, d.text) for d in stdlib_documents()],
        "code": [(m, block) for m, block in stdlib_code() if len(block) >= 80],
    }
    paths: dict[str, dict[str, Path]] = {}
    for domain, rows in docs.items():
        paths[domain] = {}
        for split, limit in (("train", max_train), ("held_out", max_held_out)):
            texts = [text for module, text in rows if held_out(module) == (split == "held_out")]
            if limit is not None and len(texts) > limit:
                texts = [texts[i * len(texts) // limit] for i in range(limit)]
            paths[domain][split] = out / f"{domain}-{split}.jsonl"
            _write_jsonl(paths[domain][split], ({"text": t} for t in texts))
    return paths


def write_data(corpus: Corpus, data_dir: Path) -> None:
    """Training text (`.jsonl`), pairs (one `.jsonl` per dataset), instructions, the held-out BEIR set."""
    (data_dir / "pairs").mkdir(parents=True)
    _write_jsonl(data_dir / "train_text.jsonl", ({"text": t} for t in corpus.train_texts))
    for name, records in corpus.pairs.items():
        _write_jsonl(data_dir / "pairs" / f"{name}.jsonl", records)
    table = {name: {"instruction": text, "symmetric": sym} for name, (text, sym) in INSTRUCTIONS.items()}
    (data_dir / "instructions.json").write_text(json.dumps(table, indent=2) + "\n")
    beir = data_dir / "heldout-beir"
    (beir / "qrels").mkdir(parents=True)
    data = corpus.eval_data
    _write_jsonl(beir / "corpus.jsonl", ({"_id": k, "title": t, "text": x} for k, (t, x) in data.corpus.items()))
    _write_jsonl(beir / "queries.jsonl", ({"_id": k, "text": x} for k, x in data.queries.items()))
    lines = ["query-id\tcorpus-id\tscore"] + [
        f"{q}\t{d}\t{r}" for q, rels in data.qrels.items() for d, r in rels.items()
    ]
    (beir / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    (data_dir / "held_out_packages.txt").write_text("\n".join(corpus.held_out_packages) + "\n")


def _write_jsonl(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
