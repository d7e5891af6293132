"""`bidirlm demo` (`make demo`): the paper's pipeline in miniature, offline, on text every machine has.

The docstrings of Python's standard library, read at run time from the interpreter, are the corpus:
whole packages are held out (about a fifth, chosen by a hash of the package name, so every run holds out
the same ones) for evaluation, the rest is training text. Then, as BidirLM does with Gemma3 and Qwen3:

1. train a byte-level BPE tokenizer with a `<mask>` token on the training text;
2. pre-train a small Gemma3-shaped causal LM on it (next-token prediction): the **Base**;
3. build the variants of the paper's Figure 2 (`bidirlm_jax.variants`): Bi+Base (attention switched),
   Bi+MNTP (masked next-token prediction), Bi+MNTP+Merge (merged with the base at 0.5), Bi+Contrastive and
   Bi+MNTP+Contrastive (InfoNCE on pairs mined from the training docstrings: a docstring's summary line ↔
   its body, hard negatives from the same module);
4. evaluate retrieval on the held-out packages with every variant (queries: summary lines; corpus: the
   bodies; mean pooling; nDCG@10, MRR@10, Recall@100), print the table with deltas vs Base (Figure 2's
   presentation) and plot the deltas;
5. check our logits against transformers' on the base in both attention modes, and export the final
   encoder (Bi+MNTP+Contrastive) in sentence-transformers format.

`--model DIR` starts from a real causal checkpoint and its tokenizer instead of steps 1-2. `--quick` runs
every phase for a few steps (tests). The output directory holds `base/` (the causal base, HF format, with
its tokenizer), `encoder/` (sentence-transformers), `variants/` (each variant as an HF directory, the
training runs with their checkpoints and TensorBoard logs under `variants/runs/`, the base's under
`runs/lm/`), `data/` (tokenizer, training text, pairs, the held-out set in BEIR layout), `results.json`
and `variants.png`. Everything is written into a temporary directory renamed into place at the end; a
marker file lists what the demo wrote, so `--overwrite` replaces a previous demo output and never
anything else.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import logging
import os
import resource
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bidirlm_jax.ablation.report import METRICS, chance_level, plot_deltas
from bidirlm_jax.errors import CheckpointError, ConfigError, Preempted

TOLERANCE = 1e-4
MARKER = ".bidirlm-demo"  # JSON {"entries": [...]}: the names the demo wrote into its output directory
HELD_OUT_BUCKETS = 5  # a package is held out when crc32(name) % 5 == 0: about a fifth of the packages
INSTRUCTIONS = {
    "members": ("Given the summary line of a Python function's or class's docstring, retrieve the rest of it", False),
    "summaries": ("Given a one-line summary of a Python module, retrieve its documentation", False),
    "halves": ("Retrieve semantically similar text", True),
}
EVAL_INSTRUCTION = INSTRUCTIONS["members"][0]  # held-out queries are summary lines, as in `members`


@dataclasses.dataclass(frozen=True)
class Size:
    """Model shape, steps and batches of one demo run (`FULL`: ~10 minutes on two idle cores)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4  # Gemma3's sliding/global alternation, every other layer global
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    sliding_window: int = 32
    seq_len: int = 128
    lm_steps: int = 300
    lm_batch: int = 32
    lm_learning_rate: float = 3e-3
    mntp_steps: int = 100
    mntp_batch: int = 32
    mntp_learning_rate: float = 1e-3
    contrastive_steps: int = 100
    contrastive_batch: int = 32
    contrastive_seq_len: int = 64
    contrastive_learning_rate: float = 1e-3
    num_negatives: int = 1
    max_eval_queries: int = 400


FULL = Size()
QUICK = Size(
    vocab_size=512, hidden_size=64, intermediate_size=128, seq_len=64, lm_steps=6, lm_batch=8, mntp_steps=4,
    mntp_batch=8, contrastive_steps=4, contrastive_batch=8, contrastive_seq_len=48, max_eval_queries=48,
)  # fmt: skip


def check_output(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The resolved output directory, or a `CheckpointError` before any work when it must not be touched.

    A missing or empty directory is used; a previous demo output (marker present, nothing foreign added)
    only with `overwrite`; anything else never, since the demo replaces its output directory as a whole.
    """
    out = Path(out_dir).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise CheckpointError(f"--out {out_dir} is (or contains) the current directory; choose a new directory")
    if not out.exists():
        return out
    if not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; choose a directory")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return out
    if MARKER not in entries:
        raise CheckpointError(
            f"--out {out} exists and is not a `bidirlm demo` output; choose a new directory "
            "(--overwrite only replaces a previous demo output)"
        )
    if not overwrite:
        raise CheckpointError(f"--out {out} holds a previous demo output; pass --overwrite to replace it")
    try:
        written = set(json.loads((out / MARKER).read_text())["entries"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{out / MARKER} is unreadable ({e}); remove {out} yourself or choose another --out"
        ) from None
    if foreign := sorted(entries - written - {MARKER}):
        raise CheckpointError(
            f"--out {out} holds files the demo did not write ({', '.join(foreign)}); move them or choose another --out"
        )
    return out


# --- the corpus: the standard library's docstrings ----------------------------------------------------


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
    (`{"text": ...}` per line) for MNTP mixtures and held-out evaluation (`mntp.eval_data`): `english`, the
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


# --- the phases -----------------------------------------------------------------------------------------


class Timer:
    """Wall-clock and CPU seconds (this process, all threads) of each phase, printed as it ends. On a busy
    machine the CPU seconds tell what the phase costs better than the wall clock."""

    def __init__(self, echo: Callable[[str], None] = print):
        self.phases: dict[str, dict[str, float]] = {}
        self._echo = echo
        self._start = time.perf_counter()
        self._cpu = _cpu_seconds()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, str]]:
        note: dict[str, str] = {}
        start = time.perf_counter()
        yield note
        self.record(name, time.perf_counter() - start, note.get("text", ""))

    def record(self, name: str, seconds: float, text: str = "") -> None:
        cpu = _cpu_seconds()
        self.phases[name] = {"wall": round(seconds, 2), "cpu": round(cpu - self._cpu, 2) if seconds else 0.0}
        self._cpu = cpu
        clock = f"{time.perf_counter() - self._start:5.0f}s"
        self._echo(f"[{clock}] {name:<30} {seconds:6.1f}s (cpu {self.phases[name]['cpu']:6.1f}s)  {text}".rstrip())


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _lm_config(size: Size, init_dir: Path, tokens: Path, progress: bool):
    from bidirlm_jax.configs import lm

    c = lm.get_config("tiny")
    c.model.init_from = str(init_dir)
    c.data.update(source="npy", path=str(tokens), seq_len=size.seq_len, global_batch_size=size.lm_batch, seed=0)
    c.optim.update(learning_rate=size.lm_learning_rate, warmup_steps=max(1, size.lm_steps // 15), decay_fraction=0.2,
                   weight_decay=0.0)  # fmt: skip
    c.train.update(steps=size.lm_steps, checkpoint_every=size.lm_steps, log_every=max(1, size.lm_steps // 30))
    c.metrics.progress_bar = progress
    return c


def stage_configs(size: Size, data_dir: Path, tokenizer: Path | None, progress: bool = False) -> tuple[Any, Any]:
    """The MNTP and contrastive training configs of the variants (`configs/mntp.py`, `configs/contrastive.py`
    presets, on the demo's data); `tokenizer` None = the base checkpoint's own."""
    from bidirlm_jax.configs import contrastive, mntp

    m = mntp.get_config("tiny")
    m.data.update(source="text", path=str(data_dir / "train_text.jsonl"), seq_len=size.seq_len,
                  global_batch_size=size.mntp_batch, seed=0, tokenizer=str(tokenizer or ""))  # fmt: skip
    m.mntp.chunk_size = 8192
    m.optim.update(learning_rate=size.mntp_learning_rate, warmup_steps=max(1, size.mntp_steps // 10),
                   decay_fraction=0.2, weight_decay=0.0)  # fmt: skip
    m.train.update(steps=size.mntp_steps, checkpoint_every=size.mntp_steps, log_every=max(1, size.mntp_steps // 20))
    m.metrics.progress_bar = progress
    c = contrastive.get_config("tiny")
    c.data.update(source="pairs", path=str(data_dir / "pairs"), seq_len=size.contrastive_seq_len,
                  global_batch_size=size.contrastive_batch, seed=0, tokenizer=str(tokenizer or ""))  # fmt: skip
    c.contrastive.update(
        num_negatives=size.num_negatives, chunk_size=0, instructions=str(data_dir / "instructions.json")
    )
    c.optim.update(learning_rate=size.contrastive_learning_rate, warmup_steps=max(1, size.contrastive_steps // 10),
                   weight_decay=0.0)  # fmt: skip
    c.train.update(steps=size.contrastive_steps, checkpoint_every=size.contrastive_steps,
                   log_every=max(1, size.contrastive_steps // 20))  # fmt: skip
    c.metrics.progress_bar = progress
    return m, c


def _train_tokenizer(texts: list[str], size: Size, out: Path):
    from bidirlm_jax.io.tokenizer import train_tokenizer

    return train_tokenizer(texts, size.vocab_size, out)


def _tokens_file(texts: list[str], tokenizer, path: Path) -> int:
    """The training text as one stream of ids (`<bos>` doc `<eos>` ...), for the causal-LM objective."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    stream = np.concatenate([np.asarray([*seq, tokenizer.eos_token_id], np.int32) for seq in ids])
    np.save(path, stream)
    return len(stream)


def _base_config(size: Size):
    from bidirlm_jax.models.presets import get_preset

    pattern = get_preset("tiny-gemma3").layer_types
    return get_preset(
        "tiny-gemma3",
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        num_kv_heads=size.num_kv_heads,
        head_dim=size.head_dim,
        query_pre_attn_scalar=size.head_dim,
        sliding_window=size.sliding_window,
        layer_types=tuple(pattern[i % len(pattern)] for i in range(size.num_layers)),
    )


def pretrain_base(
    out_dir: str | os.PathLike,
    texts: list[str] | None = None,
    *,
    size: Size = QUICK,
    timer: Timer | None = None,
    progress: bool = False,
) -> Path:
    """A small causal base made from scratch, offline: a byte-level BPE with `<mask>` trained on `texts`, a
    random Gemma3-shaped model of `size` and `size.lm_steps` steps of causal-LM pre-training (none: the random
    model as is). Writes `out_dir/data/` (tokenizer, token stream), `out_dir/runs/lm/` (the run) and returns
    `out_dir/base` (HF directory with its tokenizer). `texts`: default the docstrings of the packages the demo
    trains on. The demo's step 1-2; notebooks and tests use it for a checkpoint that needs no download."""
    from flax import nnx

    from bidirlm_jax.io.hf import save_pretrained, tokenizer_files
    from bidirlm_jax.models.transformer import Transformer
    from bidirlm_jax.train import train
    from bidirlm_jax.variants import run_to_hf

    out = Path(out_dir)
    data = out / "data"
    timer = timer or Timer(echo=lambda _: None)
    if texts is None:
        texts = [d.text for d in stdlib_documents() if not held_out(d.module)]
    with timer.phase("tokenizer") as note:
        tokenizer = _train_tokenizer(texts, size, data / "tokenizer")
        count = _tokens_file(texts, tokenizer, data / "train_tokens.npy")
        note["text"] = f"byte-level BPE, {len(tokenizer)} tokens with <mask>; {count:,} training tokens"
    with timer.phase("base: causal LM") as note:
        config = _base_config(size)
        model = Transformer(config, rngs=nnx.Rngs(0))
        if size.lm_steps == 0:
            note["text"] = f"{_params(config):,} parameters, random (no pre-training)"
            return save_pretrained(model, out / "base", extra_files=tokenizer_files(data / "tokenizer"))
        save_pretrained(model, data / "base-init")
        run = out / "runs" / "lm"
        result = train(_lm_config(size, data / "base-init", data / "train_tokens.npy", progress), str(run))
        if result["preempted"]:  # a half-trained base is no base: stop, exporting nothing
            raise Preempted(run, result["step"])
        base = run_to_hf(run, out / "base", attention="causal", tokenizer_from=data / "tokenizer")
        note["text"] = f"{_params(config):,} parameters, {size.lm_steps} steps, {_loss_summary(run)}"
    return base


def _params(config) -> int:
    from bidirlm_jax.io.params import param_count

    return param_count(config)


def _loss_summary(run: Path) -> str:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        return "no logged steps"
    text = f"loss {rows[0]['loss']:.2f} -> {rows[-1]['loss']:.2f}"
    if "masked_accuracy" in rows[-1]:
        text += f", masked accuracy {rows[0]['masked_accuracy']:.2f} -> {rows[-1]['masked_accuracy']:.2f}"
    return text


def _evaluate(variants: dict, corpus: Corpus, size: Size, timer: Timer) -> dict[str, dict[str, float]]:
    """Every variant on the held-out set: mean pooling, queries instructed only for the variants trained so."""
    from bidirlm_jax.evals.retrieval import evaluate_retrieval

    results = {}
    with _quiet("bidirlm_jax.embed.encode"):  # long bodies are cut at max_length on purpose
        for name, variant in variants.items():
            with timer.phase(f"eval: {name}") as note:
                metrics = evaluate_retrieval(
                    variant.load(), variant.tokenizer(), corpus.eval_data, pooling="mean",
                    instruction=EVAL_INSTRUCTION if variant.contrastive else None, max_length=size.seq_len,
                    batch_size=64, progress=False,
                )  # fmt: skip
                results[name] = {"attention": variant.attention, **metrics}
                note["text"] = f"nDCG@10 {100 * metrics['ndcg_at_10']:.1f}"
    return results


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def format_table(results: dict[str, dict[str, float]], num_queries: int, num_documents: int) -> str:
    """The variant table: each metric ×100 and its delta vs Base (the paper's Figure 2 plots the deltas)."""
    base = results.get("Base")
    head = f"{'variant':<22} {'attention':<14}" + "".join(f"{label:>9} {'Δ':>6}" for _, label in METRICS)
    lines = [
        f"retrieval on held-out standard-library packages: {num_queries} queries (summary lines), "
        f"{num_documents} documents (docstring bodies); ×100, Δ vs Base",
        head,
        "-" * len(head),
    ]
    for name, row in results.items():
        cells = ""
        for key, _ in METRICS:
            value = 100 * row[key]
            delta = "" if base is None or name == "Base" else f"{value - 100 * base[key]:+6.1f}"
            cells += f"{value:9.1f} {delta:>6}"
        lines.append(f"{name:<22} {row['attention']:<14}{cells}")
    chance = chance_level(num_documents)
    lines.append(f"{'(chance)':<22} {'':<14}" + "".join(f"{100 * chance[key]:9.1f} {'':>6}" for key, _ in METRICS))
    return "\n".join(lines)


def parity(base: Path, bi_base: Path, texts: list[str], seq_len: int) -> list[tuple[str, float]]:
    """Our logits vs transformers' (eager, fp32) on the base, in both attention modes, on real padded text
    longer than the sliding window. transformers reads the mode from each directory's config."""
    import transformers

    from bidirlm_jax.io.hf import from_pretrained
    from bidirlm_jax.io.tokenizer import load_tokenizer
    from bidirlm_jax.testing import reference

    tokenizer = load_tokenizer(base)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows = []
    for label, path, attention in (("causal", base, "causal"), ("bidirectional", bi_base, "bidirectional")):
        theirs_model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float()
        theirs = reference.hf_logits(theirs_model.eval(), ids, mask)
        ours = reference.logits(from_pretrained(path, attention=attention), ids, mask)
        rows.append((f"base, {label} attention", reference.max_rel_err(ours, theirs, mask)))
    return rows


# --- the whole run -------------------------------------------------------------------------------------


def _pipeline(tmp: Path, *, model: str | None, size: Size, progress: bool) -> dict[str, Any]:
    """Every phase, into the (temporary) output directory `tmp`; returns what `results.json` records."""
    from bidirlm_jax.embed.encode import query_prompt
    from bidirlm_jax.io.sentence_transformers import export_encoder
    from bidirlm_jax.variants import BI_BASE, BI_MNTP_CONTRASTIVE, Recipe, build_variants, switch_attention

    timer = Timer()
    with timer.phase("data") as note:
        corpus = build_corpus(num_negatives=size.num_negatives, max_eval_queries=size.max_eval_queries)
        write_data(corpus, tmp / "data")
        pairs = ", ".join(f"{len(v)} {k}" for k, v in corpus.pairs.items())
        note["text"] = (
            f"{len(corpus.train_texts)} training docstrings; pairs: {pairs}; held out: "
            f"{len(corpus.held_out_packages)} packages, {len(corpus.eval_data.queries)} queries"
        )
    if model is None:
        base = pretrain_base(tmp, corpus.train_texts, size=size, timer=timer, progress=progress)
        tokenizer = tmp / "data" / "tokenizer"
    else:
        with timer.phase("base: --model") as note:
            base = switch_attention(model, tmp / "base", "causal")
            tokenizer = None
            note["text"] = str(model)
    mntp_config, contrastive_config = stage_configs(size, tmp / "data", tokenizer, progress)
    recipe = Recipe(mntp=mntp_config, contrastive=contrastive_config)

    def report(name, variant, seconds):
        detail = _loss_summary(variant.run) if variant.run else {"Base": "the causal base, as is"}.get(name, "")
        if name == "Bi+MNTP+Merge":
            detail = f"Bi+MNTP ⊕ Base, weight {recipe.merge_ratio} on the base"
        elif name == BI_BASE:
            detail = "the base's weights, bidirectional attention"
        timer.record(f"variant: {name}", seconds, detail)

    variants = build_variants(base, tmp / "variants", recipe, on_phase=report)
    results = _evaluate(variants, corpus, size, timer)
    data = corpus.eval_data
    table = format_table(results, len(data.queries), len(data.corpus))
    title = f"BidirLM variants vs Base: retrieval on held-out stdlib packages ({len(data.queries)} queries)"
    plot_deltas(results, tmp / "variants.png", title)
    with timer.phase("export encoder") as note:
        export_encoder(variants[BI_MNTP_CONTRASTIVE].path, tmp / "encoder", pooling="mean",
                       max_length=size.seq_len, prompts={"query": query_prompt(EVAL_INSTRUCTION)})  # fmt: skip
        note["text"] = "Bi+MNTP+Contrastive, sentence-transformers format"
    with timer.phase("parity") as note:
        bodies = sorted((text for _, text in data.corpus.values()), key=len)
        sample = [bodies[-1], bodies[len(bodies) // 2], bodies[0]]  # longer than the window, and padded ones
        checks = parity(base, variants[BI_BASE].path, sample, size.seq_len)
        note["text"] = "our logits vs transformers'"
    record = {
        "table": table,
        "results": results,
        "eval": {
            "queries": len(data.queries),
            "documents": len(data.corpus),
            "instruction": EVAL_INSTRUCTION,
            "held_out_packages": corpus.held_out_packages,
        },
        "parity": {name: err for name, err in checks},
        "phases_seconds": timer.phases,
        "size": dataclasses.asdict(size),
        "model": str(model) if model else None,
        "recipe": {"merge_ratio": recipe.merge_ratio, "contrastive_from": recipe.contrastive_from},
    }
    (tmp / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _warn_if_cpu(model: Path, quick: bool) -> None:
    import jax

    from bidirlm_jax.io.params import param_count

    count = param_count(model)
    if jax.default_backend() == "cpu" and count > 50_000_000 and not quick:
        print(
            f"note: --model has {count / 1e6:.0f}M parameters and JAX runs on the CPU; the variants' "
            f"{FULL.mntp_steps} + 2 × {FULL.contrastive_steps} training steps will take hours (--quick: a few steps)",
            file=sys.stderr,
        )


def run_demo(
    out_dir: str | os.PathLike = "demo_out",
    *,
    overwrite: bool = False,
    model: str | os.PathLike | None = None,
    quick: bool = False,
    progress: bool | None = None,
) -> int:
    """Run the demo into `out_dir`; 0 when it finished and the parity checks are within `TOLERANCE`."""
    import transformers

    from bidirlm_jax.io.atomic import atomic_directory

    out = check_output(out_dir, overwrite=overwrite)
    if model is not None:
        model = Path(model).expanduser().resolve()
        if not (model / "config.json").is_file() or not (model / "tokenizer.json").is_file():
            raise ConfigError(
                f"--model {model} must be a Hugging Face checkpoint directory with config.json and tokenizer.json"
            )
    size = QUICK if quick else FULL
    if model is not None:  # a pre-trained model: the paper's order of learning rates, not a fresh model's
        size = dataclasses.replace(size, mntp_learning_rate=1e-4, contrastive_learning_rate=5e-5)
        _warn_if_cpu(model, quick)
    progress = sys.stderr.isatty() and not quick if progress is None else progress
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    start, cpu = time.perf_counter(), _cpu_seconds()
    try:
        with atomic_directory(out, overwrite=out.exists()) as tmp:
            record = _pipeline(tmp, model=model, size=size, progress=progress)
            (tmp / MARKER).write_text(json.dumps({"entries": sorted(p.name for p in tmp.iterdir())}) + "\n")
    except Preempted as e:  # its runs lay in the temporary output, now removed
        raise Preempted(e.workdir, e.step, kept=False) from None
    print()
    print(record["table"])
    if quick:
        print(
            "\nsmoke run (--quick: a few steps per phase), not meaningful: these numbers say the pipeline runs, "
            "not what BidirLM does; run `bidirlm demo` without --quick for the README's table"
        )
    print()
    ok = True
    for name, err in record["parity"].items():
        good = err < TOLERANCE
        ok &= good
        print(
            f"parity vs transformers, {name:<28} max |Δlogit| / max |logit| {err:.2e}  {'ok' if good else 'MISMATCH'}"
        )
    print(
        f"\n{time.perf_counter() - start:.0f}s in all ({_cpu_seconds() - cpu:.0f} CPU seconds). Written to {out}/: "
        "base/ (the causal base, HF), encoder/ (sentence-transformers), variants/, variants.png, results.json; "
        f"training curves: tensorboard --logdir {out}"
    )
    return 0 if ok else 1
