"""`bidirlm demo` and `bidirlm ablate`: the paper's pipeline in miniature and its studies."""

from __future__ import annotations

import argparse
import sys

from bidirlm_jax.paths import user_path


def add_demo(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="BidirLM's pipeline in miniature on the standard library's docstrings (offline, ~10 minutes)",
        description="Train a tokenizer and a small causal base on the Python standard library's docstrings, build "
        "the paper's variants (Bi+Base, Bi+MNTP, merged, Bi+Contrastive, Bi+MNTP+Contrastive), evaluate retrieval "
        "on held-out modules and print the variant table and plot. The outputs are written to a temporary "
        "directory and renamed into place.",
    )
    p.add_argument(
        "--out", type=user_path, default="demo_out", help="output directory: new, empty, or a previous demo output"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo output (and nothing else)")
    p.add_argument(
        "--model",
        type=user_path,
        help="start from this causal HF checkpoint (with its tokenizer) instead of pre-training",
    )
    p.add_argument("--quick", action="store_true", help="a few steps per phase (a smoke run)")
    p.add_argument(
        "--omni",
        action="store_true",
        help="a Qwen3-shaped base, then BidirLM-Omni in miniature: vision and audio specialists grown from it "
        "(photographs, espeak-ng speech), composed with Bi+MNTP, trained on mixed pairs, retrieval across "
        "modalities (~7 more minutes; needs espeak-ng)",
    )
    return p


def run_demo(args: argparse.Namespace) -> int:
    from bidirlm_jax import demo

    return demo.run_demo(args.out, overwrite=args.overwrite, model=args.model, quick=args.quick, omni=args.omni)


_ABLATE_USAGE = """usage: bidirlm ablate --config configs/ablation.py[:PRESET] --workdir DIR [--config.key=value ...]

The paper's ablation for one base model: build (or take) the variants Base, Bi+Base, Bi+MNTP, Bi+Contrastive,
Bi+MNTP+Contrastive, fine-tune each on each task, and write DIR/results.jsonl, DIR/results.md, DIR/deltas.png
(deltas vs Base, Figure 2) and the merge-ratio sweep DIR/merge_ratio.json, DIR/merge_ratio.png (Figure 4).
Running it again reuses every finished cell. Keys: bidirlm_jax/configs/ablation.py, e.g.
--config.tasks=fruit,docstrings --config.finetune.steps=100 --config.paths.bi_mntp=HF_DIR.

       bidirlm ablate --config configs/specialists.py[:PRESET] --workdir DIR [--config.key=value ...]

The composition study (paper section 6, Figures 6-8): merge a Bi+MNTP encoder with a causal specialist at each
ratio, fine-tune Bi+MNTP, Bi+Specialist and every merge on the task, and write DIR/results.jsonl, DIR/results.md
(with the layer-wise cosine similarity), DIR/learning_curves.png and DIR/merge_ratio.png. Presets: tiny (offline),
safety, vision, audio; keys: bidirlm_jax/configs/specialists.py."""


def add_ablate(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="variants x tasks table and merge-ratio sweep (paper Fig. 2, 4)",
        prefix_chars="+",
        add_help=False,
    )
    p.add_argument("flags", nargs=argparse.REMAINDER)
    return p


def run_ablate(args: argparse.Namespace) -> int:
    if not args.flags or {"-h", "--help"} & set(args.flags):
        print(_ABLATE_USAGE, file=sys.stdout if args.flags else sys.stderr)
        return 0 if args.flags else 2
    from bidirlm_jax import configs
    from bidirlm_jax.ablation.harness import parse_args, run_ablation

    config, workdir = parse_args(configs.resolve_args(args.flags))
    if "specialist" in config:  # configs/specialists.py: the composition study
        from bidirlm_jax.ablation.composition import run_composition

        result = run_composition(config, workdir)
        print(
            f"\n{result.markdown}\n\n{len(result.computed)} cells computed, {len(result.reused)} reused; in {workdir}/: "
            "results.jsonl, results.md, learning_curves.png, merge_ratio.png, similarity.json"
        )
        return 0
    result = run_ablation(config, workdir)
    print()
    print(result.markdown)
    sweep = ", merge_ratio.json, merge_ratio.png" if result.sweep_png else ""
    print(
        f"\n{len(result.computed)} cells computed, {len(result.reused)} reused; in {workdir}/: results.jsonl, results.md, deltas.png{sweep}"
    )
    return 0
