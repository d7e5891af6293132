"""Tiny encoder sources shared by the encode, export, retrieval, paths and MTEB tests: a copy of a conftest
model directory with a tokenizer trained on a small vocabulary, texts of it, a BEIR directory of it, and
`bidirlm` run in-process."""

import json
import shutil

import numpy as np

from bidirlm_jax import cli
from bidirlm_jax.io.tokenizer import train_tokenizer

VOCABULARY = (
    "alpha beta gamma delta the quick brown fox jumps over a lazy dog while river stones shine under dark "
    "light code python function returns value list of items number error"
)
WORDS = VOCABULARY.split()
MAX_LENGTH = 64  # buckets 16, 32, 64
TEXTS = [
    "the quick brown fox",
    " ".join(WORDS),  # ~40 tokens
    "dog",
    "return the value of a function",
    " ".join(WORDS * 3),  # longer than MAX_LENGTH: truncated
    "river stones shine under dark light while the lazy dog sleeps",
    "x",
]


def make_encoder_src(model_dir, out_dir):
    """A copy of a conftest model directory with a tiny byte-level BPE tokenizer (vocab 400 < 512 rows)."""
    shutil.copytree(model_dir, out_dir)
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, 12)) for _ in range(200)]
    train_tokenizer(corpus, 400, out_dir / "tokenizer")
    for file in (out_dir / "tokenizer").iterdir():
        shutil.move(file, out_dir / file.name)
    (out_dir / "tokenizer").rmdir()
    return out_dir


def run_cli(argv, capsys=None):
    """`bidirlm ARGV`, its exit status."""
    return cli.main([str(a) for a in argv])


def make_beir(root, *, num_docs=24, num_queries=6, seed=0):
    """A small BEIR directory: titled and untitled documents, graded qrels, an unjudged query."""
    rng = np.random.default_rng(seed)
    (root / "qrels").mkdir(parents=True)
    with (root / "corpus.jsonl").open("w") as f:
        for i in range(num_docs):
            title = " ".join(rng.choice(WORDS, 2)) if i % 3 else ""
            f.write(json.dumps({"_id": f"doc{i}", "title": title, "text": " ".join(rng.choice(WORDS, 10))}) + "\n")
    with (root / "queries.jsonl").open("w") as f:
        for i in range(num_queries + 1):
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(rng.choice(WORDS, 4))}) + "\n")
    with (root / "qrels" / "test.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i in range(num_queries):
            for j in rng.choice(num_docs, 3, replace=False):
                f.write(f"q{i}\tdoc{j}\t{rng.integers(0, 3)}\n")
            f.write(f"q{i}\tdoc{(i * 5) % num_docs}\t1\n")  # at least one relevant document per query
    return root
