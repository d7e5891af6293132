"""First call of `encode` in a fresh process: compilation cache off, cold (empty) and warm, vs sentence-transformers.

The same exported `bench-qwen3` encoder and stdlib paragraphs as `encode.py`. Every side is a fresh process that
loads the encoder and times its first `encode` of all the texts (the figure a one-off `bidirlm embed` or a notebook
cell pays); the sides are interleaved in rounds (`measure.Bench`). Ours runs with the persistent compilation cache
(`bidirlm_jax.enable_compilation_cache`) switched off, with an empty cache directory (cold: compiles and writes),
and with the directory the cold run of that round filled (warm: reads). Also: how many programs `encode`
compiled for these texts (one per packed batch shape, read off its jit cache).

    .venv/bin/python benchmarks/first_call.py [--texts 256 --iters 3]   (quick: --texts 64 --iters 1)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import Bench, format_ratio, paired_ratio

SIDES = ("ours, cache off", "ours, cold cache", "ours, warm cache", "sentence-transformers")


def child(side: str, encoder: str, cache: str, n_texts: int, batch_size: int, max_length: int) -> None:
    """One side's first call, alone in this process: prints its seconds (wall and CPU) as JSON."""
    from encode import texts_of

    texts = texts_of(n_texts)
    start = time.perf_counter()
    if side == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(encoder, device="cpu")
        loaded, cpu0 = time.perf_counter(), time.process_time()
        st.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    else:
        from bidirlm_jax import enable_compilation_cache

        enable_compilation_cache(cache)  # "off", or a directory
        from bidirlm_jax.embed.encode import encode
        from bidirlm_jax.io.sentence_transformers import load_encoder

        model, tokenizer, _ = load_encoder(encoder)
        loaded, cpu0 = time.perf_counter(), time.process_time()
        encode(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, progress=False)
    end = time.perf_counter()
    result = dict(load=loaded - start, first_call=end - loaded, cpu=time.process_time() - cpu0)
    if side != "sentence-transformers":
        from bidirlm_jax.embed import encode as encode_module

        result["programs"] = encode_module._embed._cache_size()  # batch shapes compiled (or read from the cache)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--iters", type=int, default=3, help="interleaved rounds, each side a fresh process")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "first_call.json"))
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "ENCODER", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.texts, args.batch_size, args.max_length)
    from encode import build_encoder

    bench = Bench(threads={"torch": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))})
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "BIDIRLM_COMPILATION_CACHE"}
    results = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        encoder = build_encoder(Path(tmp), args.max_length)
        caches = iter(range(10**6))
        current = {}

        def run(side: str) -> None:
            if side == "ours, cold cache":
                current["dir"] = str(Path(tmp) / f"cache-{next(caches)}")  # empty: this round's cold run fills it
            cache = {"ours, cache off": "off", "sentence-transformers": "off"}.get(side) or current["dir"]
            command = [sys.executable, __file__, "--child", side, str(encoder), cache, "--texts", str(args.texts)]
            command += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parent)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
            results[side].append(json.loads(line[-1][7:]))

        # The cold run of a round must precede its warm run: keep that pair in order, alternate the rest.
        sides = {side: (lambda side=side: run(side)) for side in SIDES}
        sides["ours, cold + warm cache"] = lambda: (run("ours, cold cache"), run("ours, warm cache"))
        for side in ("ours, cold cache", "ours, warm cache"):
            del sides[side]
        bench.rounds(sides, args.iters)
    print(f"{'side':<24}{'first call s (best)':>21}{'median':>9}{'load s':>8}{'texts/s':>9}")
    rows = {}
    for side, runs in results.items():
        rows[side] = dict(times=[r["first_call"] for r in runs], cpu_times=[r["cpu"] for r in runs])
        best = min(rows[side]["times"])
        median = sorted(rows[side]["times"])[len(runs) // 2]
        load = min(r["load"] for r in runs)
        print(f"{side:<24}{best:>21.2f}{median:>9.2f}{load:>8.2f}{args.texts / best:>9.1f}")
    programs = results[SIDES[0]][0]["programs"]
    print(f"{args.texts} texts, batch {args.batch_size}: encode compiled {programs} programs (one per batch shape)")
    for side in SIDES[:3]:
        ratio = paired_ratio(rows[side], rows["sentence-transformers"])
        bench.ratios[f"sentence-transformers / {side}"] = ratio
        print("  " + format_ratio(f"first call, sentence-transformers / {side}", ratio))
    bench.finish(args.out, dict(first_calls=results, programs=programs, texts=args.texts))


if __name__ == "__main__":
    main()
