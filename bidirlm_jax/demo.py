"""`bidirlm demo` (`make demo`): the paper's pipeline in miniature, offline, on text every machine has.

The docstrings of Python's standard library, read at run time from the interpreter, are the corpus:
whole packages are held out (about a fifth, chosen by a hash of the package name, so every run holds out
the same ones) for evaluation, the rest is training text. Then, as BidirLM does with Gemma3 and Qwen3:

1. train a byte-level BPE tokenizer with a `<mask>` token on the training text;
2. pre-train a small Gemma3-shaped causal LM on it (next-token prediction): the **Base**;
3. build the variants of the paper's Figure 2 (`bidirlm_jax.pipeline.variants`): Bi+Base (attention switched),
   Bi+MNTP (masked next-token prediction), Bi+MNTP+Merge (merged with the base at 0.5), Bi+Contrastive and
   Bi+MNTP+Contrastive (InfoNCE on pairs mined from the training docstrings: a docstring's summary line ↔
   its body, hard negatives from the same module);
4. evaluate retrieval on the held-out packages with every variant (queries: summary lines; corpus: the
   bodies; mean pooling; nDCG@10, MRR@10, Recall@100), print the table with deltas vs Base (Figure 2's
   presentation) and plot the deltas;
5. check our logits against transformers' on the base in both attention modes, and export the final
   encoder (Bi+MNTP+Contrastive) in sentence-transformers format.

6. with `--omni` (`make demo` runs it) the base is Qwen3-shaped and BidirLM-Omni follows in miniature
   (`bidirlm_jax.pipeline.omni`): a vision and an audio specialist grown from the base on photographs and
   espeak-ng speech, composed with Bi+MNTP (and, to compare, the towers on Bi+MNTP alone), trained on the
   Omni mixture with frozen towers, and text→text / text→image / text→audio retrieval for every model,
   printed as a table, plotted (`omni.png`) and exported (`encoder-omni/`, the released layout).

`--model DIR` starts from a real causal checkpoint and its tokenizer instead of steps 1-2. `--quick` runs
every phase for a few steps (tests). The output directory holds `base/` (the causal base, HF format, with
its tokenizer), `encoder/` (sentence-transformers), `variants/` (each variant as an HF directory, the
training runs with their checkpoints and TensorBoard logs under `variants/runs/`, the base's under
`runs/lm/`), `data/` (tokenizer, training text, pairs, the held-out set in BEIR layout), `results.json`
and `variants.png`. Everything is written into a temporary directory renamed into place at the end; a
marker file lists what the demo wrote, so `--overwrite` replaces a previous demo output and never
anything else. The pipeline's parts (corpus, base pre-training, variants, evaluation, report) are
`bidirlm_jax.pipeline`'s; this module runs them in order and owns the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bidirlm_jax.configs.sizes import FULL, QUICK, Size, stage_configs
from bidirlm_jax.errors import CheckpointError, ConfigError, Preempted
from bidirlm_jax.pipeline.base import pretrain_base
from bidirlm_jax.pipeline.corpus import EVAL_INSTRUCTION, build_corpus, write_data
from bidirlm_jax.pipeline.evaluate import evaluate_variants
from bidirlm_jax.pipeline.report import format_table, loss_summary, plot_deltas
from bidirlm_jax.pipeline.timer import Timer, cpu_seconds

TOLERANCE = 1e-4
MARKER = ".bidirlm-demo"  # JSON {"entries": [...]}: the names the demo wrote into its output directory


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


def _pipeline(tmp: Path, *, model: str | None, size: Size, progress: bool, omni: bool) -> dict[str, Any]:
    """Every phase, into the (temporary) output directory `tmp`; returns what `results.json` records."""
    from bidirlm_jax.embed.encode import query_prompt
    from bidirlm_jax.io.sentence_transformers import export_encoder
    from bidirlm_jax.pipeline.stages import switch_attention
    from bidirlm_jax.pipeline.variants import BI_BASE, BI_MNTP_CONTRASTIVE, Recipe, build_variants

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
        detail = loss_summary(variant.run) if variant.run else {"Base": "the causal base, as is"}.get(name, "")
        if name == "Bi+MNTP+Merge":
            detail = f"Bi+MNTP ⊕ Base, weight {recipe.merge_ratio} on the base"
        elif name == BI_BASE:
            detail = "the base's weights, bidirectional attention"
        timer.record(f"variant: {name}", seconds, detail)

    variants = build_variants(base, tmp / "variants", recipe, on_phase=report)
    results = evaluate_variants(variants, corpus, size, timer)
    data = corpus.eval_data
    table = format_table(results, len(data.queries), len(data.corpus))
    title = f"BidirLM variants vs Base: retrieval on held-out stdlib packages ({len(data.queries)} queries)"
    plot_deltas(results, tmp / "variants.png", title)
    with timer.phase("export encoder") as note:
        export_encoder(
            variants[BI_MNTP_CONTRASTIVE].path,
            tmp / "encoder",
            pooling="mean",
            max_length=size.seq_len,
            prompts={"query": query_prompt(EVAL_INSTRUCTION)},
        )
        note["text"] = "Bi+MNTP+Contrastive, sentence-transformers format"
    with timer.phase("parity") as note:
        bodies = sorted((text for _, text in data.corpus.values()), key=len)
        sample = [bodies[-1], bodies[len(bodies) // 2], bodies[0]]  # longer than the window, and padded ones
        checks = parity(base, variants[BI_BASE].path, sample, size.seq_len)
        note["text"] = "our logits vs transformers'"
    if omni:
        record_omni = _omni(tmp, base, variants, corpus, recipe, size, timer, progress)
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
    if omni:
        record["omni"] = record_omni
    (tmp / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _omni(tmp: Path, base: Path, variants: dict, corpus, recipe, size: Size, timer: Timer, progress: bool) -> dict:
    """The Omni stage (`pipeline.omni`) on this run's base and Bi+MNTP: its table, plot and results."""
    from bidirlm_jax.embed.encode import query_prompt
    from bidirlm_jax.io.omni_export import export_omni
    from bidirlm_jax.pipeline.omni import COMPOSED, omni_stage
    from bidirlm_jax.pipeline.report import format_cross_modal, plot_cross_modal
    from bidirlm_jax.pipeline.variants import BI_MNTP, BI_MNTP_CONTRASTIVE

    results = omni_stage(
        tmp / "omni",
        base=base,
        bi_mntp=variants[BI_MNTP].path,
        text_encoder=variants[BI_MNTP_CONTRASTIVE].path,
        corpus=corpus,
        template=recipe.contrastive,
        size=size,
        timer=timer,
        progress=progress,
    )
    held_out = {"text": f"{len(corpus.eval_data.queries)} queries, {len(corpus.eval_data.corpus)} docstrings"}
    for task in ("image", "audio"):
        row = next(r["tasks"][task] for r in results.values() if task in r["tasks"])
        held_out[task] = f"{row['num_queries']} queries, {'crops' if task == 'image' else 'clips'} of other seeds"
    table = format_cross_modal(results, held_out)
    plot_cross_modal(results, tmp / "omni.png", "BidirLM-Omni in miniature: held-out retrieval across modalities")
    with timer.phase("export Omni encoder") as note:
        export_omni(
            results[COMPOSED]["path"],
            tmp / "encoder-omni",
            max_length=size.seq_len,
            prompts={"query": query_prompt(EVAL_INSTRUCTION)},
        )
        note["text"] = f"{COMPOSED}, the released BidirLM-Omni layout with sentence-transformers modules"
    for row in results.values():
        row["path"] = str(Path(row["path"]).relative_to(tmp))
    return {"table": table, "results": results}


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
    omni: bool = False,
) -> int:
    """Run the demo into `out_dir`; 0 when it finished and the parity checks are within `TOLERANCE`. `omni`:
    a Qwen3-shaped base, then the Omni stage (`pipeline.omni`) after the text variants."""
    import transformers

    from bidirlm_jax.io.atomic import atomic_directory

    out = check_output(out_dir, overwrite=overwrite)
    if model is not None:
        model = Path(model).expanduser().resolve()
        if not (model / "config.json").is_file() or not (model / "tokenizer.json").is_file():
            raise ConfigError(
                f"--model {model} must be a Hugging Face checkpoint directory with config.json and tokenizer.json"
            )
    if omni and model is not None:
        raise ConfigError(
            "--omni grows its vision and audio specialists from the demo's own base (with Qwen's media markers in "
            "its tokenizer); drop --model, or drop --omni to run the text variants on your model"
        )
    size = QUICK if quick else FULL
    if omni:
        size = dataclasses.replace(size, family="qwen3")
    if model is not None:  # a pre-trained model: the paper's order of learning rates, not a fresh model's
        size = dataclasses.replace(size, mntp_learning_rate=1e-4, contrastive_learning_rate=5e-5)
        _warn_if_cpu(model, quick)
    progress = sys.stderr.isatty() and not quick if progress is None else progress
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    start, cpu = time.perf_counter(), cpu_seconds()
    try:
        with atomic_directory(out, overwrite=out.exists()) as tmp:
            record = _pipeline(tmp, model=model, size=size, progress=progress, omni=omni)
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
    if omni:
        print()
        print(record["omni"]["table"])
    print()
    ok = True
    for name, err in record["parity"].items():
        good = err < TOLERANCE
        ok &= good
        print(
            f"parity vs transformers, {name:<28} max |Δlogit| / max |logit| {err:.2e}  {'ok' if good else 'MISMATCH'}"
        )
    print(
        f"\n{time.perf_counter() - start:.0f}s in all ({cpu_seconds() - cpu:.0f} CPU seconds). Written to {out}/: "
        "base/ (the causal base, HF), encoder/ (sentence-transformers), variants/, variants.png, results.json"
        f"{', encoder-omni/ (BidirLM-Omni), omni/ (specialists, Omni composed and not), omni.png' if omni else ''}; "
        f"training curves: tensorboard --logdir {out}"
    )
    return 0 if ok else 1
