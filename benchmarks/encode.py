"""Embedding throughput: our `encode` vs sentence-transformers on the exported encoder, same texts and batch size.

The project's benchmark model (preset `bench-qwen3`, 41.6M parameters, random weights), bidirectional, fp32, a
BPE tokenizer trained on the standard library's docstrings, and paragraphs of those docstrings as texts (real
lengths: a few to a few hundred tokens, max 512). Both sides sort by length; ours pads to a few bucket shapes
compiled once, sentence-transformers to each batch's longest text. Warm throughput (best of `--repeats` alternated
passes, after one pass that compiles / warms up), and ours including compilation. Target: >= 1.5x sentence-transformers.

    .venv/bin/python benchmarks/encode.py [--texts 256 --batch-size 32 --max-length 512]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from sentence_transformers import SentenceTransformer

from bidirlm_jax.data.stdlib_text import stdlib_docstrings
from bidirlm_jax.embed.encode import encode
from bidirlm_jax.io.hf_config import config_to_hf
from bidirlm_jax.io.sentence_transformers import export_encoder, load_encoder
from bidirlm_jax.io.tokenizer import train_tokenizer
from bidirlm_jax.models.presets import get_preset


def _texts(n: int) -> list[str]:
    paragraphs = [p.strip() for _, doc in stdlib_docstrings() for p in doc.split("\n\n") if len(p.strip()) > 20]
    return [paragraphs[i] for i in np.random.default_rng(0).permutation(len(paragraphs))[:n]]


def _build(tmp: Path, max_length: int) -> Path:
    """Random bench-qwen3 weights saved by transformers, a trained tokenizer, exported as an encoder."""
    config = get_preset("bench-qwen3")
    src = tmp / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config_to_hf(config)))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(src)).save_pretrained(src)
    train_tokenizer([doc for _, doc in stdlib_docstrings()], 8000, tmp / "tok")
    for file in (tmp / "tok").iterdir():
        file.rename(src / file.name)
    return export_encoder(src, tmp / "encoder", max_length=max_length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each (best is reported)")
    args = parser.parse_args()
    texts = _texts(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        encoder = _build(Path(tmp), args.max_length)
        model, tokenizer, _ = load_encoder(encoder)
        st = SentenceTransformer(str(encoder), device="cpu")
        lengths = [min(len(ids), args.max_length) for ids in tokenizer(texts)["input_ids"]]
        print(
            f"bench-qwen3 bidirectional encoder, fp32, {len(texts)} texts ({np.mean(lengths):.0f} tokens on average, "
            f"max {max(lengths)}), batch {args.batch_size}, {torch.get_num_threads()} torch threads"
        )
        kw = dict(batch_size=args.batch_size, max_length=args.max_length, progress=False)
        start = time.perf_counter()
        ours = encode(model, tokenizer, texts, **kw)  # compiles each bucket shape once
        t_cold = time.perf_counter() - start
        st.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
        t_ours, t_st = [], []
        for _ in range(args.repeats):  # alternated, so that other load on the machine hits both alike
            start = time.perf_counter()
            ours = encode(model, tokenizer, texts, **kw)
            t_ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            theirs = st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
            t_st.append(time.perf_counter() - start)
        t_ours, t_st = min(t_ours), min(t_st)
        cosine = float((ours * theirs).sum(1).min())
        print(f"{'':<34}{'texts/s':>9}{'seconds':>9}")
        print(f"{'ours (warm)':<34}{len(texts) / t_ours:>9.1f}{t_ours:>9.1f}")
        print(f"{'ours (first call, with compiling)':<34}{len(texts) / t_cold:>9.1f}{t_cold:>9.1f}")
        print(f"{'sentence-transformers':<34}{len(texts) / t_st:>9.1f}{t_st:>9.1f}")
        print(
            f"ratio (warm) {t_st / t_ours:.2f}x, (first call) {t_st / t_cold:.2f}x; min cosine ours vs ST {cosine:.6f}"
        )


if __name__ == "__main__":
    main()
