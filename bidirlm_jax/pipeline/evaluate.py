"""Every variant of a pipeline on its held-out retrieval set."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from bidirlm_jax.configs.sizes import Size
from bidirlm_jax.pipeline.corpus import EVAL_INSTRUCTION, Corpus
from bidirlm_jax.pipeline.timer import Timer


def evaluate_variants(variants: dict, corpus: Corpus, size: Size, timer: Timer) -> dict[str, dict[str, float]]:
    """Every variant on the held-out set: mean pooling, queries instructed only for the variants trained so."""
    from bidirlm_jax.evals.retrieval import evaluate_retrieval

    results = {}
    with quiet("bidirlm_jax.embed.encode"):  # long bodies are cut at max_length on purpose
        for name, variant in variants.items():
            with timer.phase(f"eval: {name}") as note:
                metrics = evaluate_retrieval(
                    variant.load(),
                    variant.tokenizer(),
                    corpus.eval_data,
                    pooling="mean",
                    instruction=EVAL_INSTRUCTION if variant.contrastive else None,
                    max_length=size.seq_len,
                    batch_size=64,
                    progress=False,
                )
                results[name] = {"attention": variant.attention, **metrics}
                note["text"] = f"nDCG@10 {100 * metrics['ndcg_at_10']:.1f}"
    return results


@contextlib.contextmanager
def quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
