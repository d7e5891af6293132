"""Embedding throughput: our `encode` vs sentence-transformers on the exported encoder, same texts and batch size.

The project's benchmark model (preset `bench-qwen3`, 41.6M parameters, random weights), bidirectional, fp32, a
BPE tokenizer trained on the standard library's docstrings, and paragraphs of those docstrings as texts (real
lengths: a few to a few hundred tokens, max 512). Both sides sort by length; ours pads to a few bucket shapes
compiled once, sentence-transformers to each batch's longest text. Warm throughput (best and median of `--iters`
rounds, interleaved, after one pass that compiles / warms up; first calls in fresh processes: `first_call.py`).
Target: >= 1.5x sentence-transformers.

    .venv/bin/python benchmarks/encode.py [--texts 256 --batch-size 32 --max-length 512 --iters 3]
    (quick: --texts 64 --iters 2)
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
from measure import Bench
from sentence_transformers import SentenceTransformer

from bidirlm_jax.data.stdlib_text import stdlib_docstrings
from bidirlm_jax.embed.encode import encode
from bidirlm_jax.io.hf_config import config_to_hf
from bidirlm_jax.io.sentence_transformers import export_encoder, load_encoder
from bidirlm_jax.io.tokenizer import train_tokenizer
from bidirlm_jax.models.presets import get_preset


def texts_of(n: int) -> list[str]:
    paragraphs = [p.strip() for _, doc in stdlib_docstrings() for p in doc.split("\n\n") if len(p.strip()) > 20]
    return [paragraphs[i] for i in np.random.default_rng(0).permutation(len(paragraphs))[:n]]


def build_encoder(tmp: Path, max_length: int) -> Path:
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
    parser.add_argument("--iters", type=int, default=3, help="interleaved warm rounds (best and median reported)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "encode.json"))
    args = parser.parse_args()
    bench = Bench(threads={"torch": torch.get_num_threads()})
    texts = texts_of(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        encoder = build_encoder(Path(tmp), args.max_length)
        model, tokenizer, _ = load_encoder(encoder)
        st = SentenceTransformer(str(encoder), device="cpu")
        lengths = [min(len(ids), args.max_length) for ids in tokenizer(texts)["input_ids"]]
        print(
            f"bench-qwen3 bidirectional encoder, fp32, {len(texts)} texts ({np.mean(lengths):.0f} tokens on average, "
            f"max {max(lengths)}), batch {args.batch_size}"
        )
        kw = dict(batch_size=args.batch_size, max_length=args.max_length, progress=False)
        out = {}
        start = time.perf_counter()
        encode(model, tokenizer, texts, **kw)  # compiles each bucket shape once (first calls: first_call.py)
        print(f"  ours, first call in this process (compiling): {time.perf_counter() - start:.1f} s")
        st.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
        sides = {
            "ours": lambda: out.update(ours=encode(model, tokenizer, texts, **kw)),
            "sentence-transformers": lambda: out.update(
                st=st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
            ),
        }
        rows = bench.rounds(sides, args.iters)
        cosine = float((out["ours"] * out["st"]).sum(1).min())
        for name, row in rows.items():
            print(f"  {name:<24}{len(texts) / row['best']:>8.1f} texts/s best, {len(texts) / row['median']:.1f} median")
        bench.show_ratio("ours", "sentence-transformers")
        print(f"  min cosine ours vs sentence-transformers {cosine:.6f}")
    bench.finish(args.out, dict(texts=len(texts), mean_tokens=float(np.mean(lengths)), min_cosine=cosine))


if __name__ == "__main__":
    main()
