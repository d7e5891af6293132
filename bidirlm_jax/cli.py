"""The `bidirlm` command. Each subcommand is a thin shell over one function of the Python API.

Failures the user caused (a `BidirLMError`, a bad path, a usage error) print one `error: ...` line without
a traceback and exit with status 2; Ctrl-C exits with 130 (`bidirlm train` saves a checkpoint first; a second
Ctrl-C stops it at once). A preemption (SIGTERM) exits with 0 after a training run saved its checkpoint,
whichever command was training (`errors.Preempted`): the same command resumes it.
"""

from __future__ import annotations

import argparse
import sys

from bidirlm_jax.errors import BidirLMError, ConfigError, Preempted
from bidirlm_jax.paths import user_path


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bidirlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _COMMANDS:
        register(sub)
    return parser


_COMMANDS: list = []


def _register_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="HF directory <-> bidirlm checkpoint",
        description="Convert a Hugging Face model directory into a bidirlm (orbax) checkpoint, or back. "
        "The output is written to a temporary directory and renamed into place.",
    )
    p.add_argument("src", type=user_path, help="HF directory (config.json + safetensors) or bidirlm checkpoint")
    p.add_argument("dst", type=user_path, help="output directory (must not exist, unless --overwrite)")
    p.add_argument("--to", choices=["hf", "checkpoint"], help="output format (default: the other one)")
    p.add_argument("--attention", choices=["causal", "bidirectional"], help="attention mode to record (default: SRC's)")
    p.add_argument(
        "--bidirectional-window", choices=["half", "full", "none"], help="Gemma3 sliding layers when bidirectional"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="stored dtype of an HF output")
    p.add_argument("--max-shard-size", default="5GB", help="largest HF output shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument(
        "--allow-pickle", action="store_true", help="read pytorch_model.bin (pickle; only from sources you trust)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from bidirlm_jax.io.conversion import convert
    from bidirlm_jax.io.shards import parse_size

    out = convert(
        args.src,
        args.dst,
        to=args.to,
        attention=args.attention,
        bidirectional_window=args.bidirectional_window,
        dtype=args.dtype,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        max_shard_bytes=parse_size(args.max_shard_size),
    )
    print(f"wrote {out}")
    return 0


def _register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
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
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from bidirlm_jax.demo import run_demo

    return run_demo(args.out, overwrite=args.overwrite, model=args.model, quick=args.quick)


_COMMANDS += [_register_convert, _register_demo]


def _register_merge(sub: argparse._SubParsersAction) -> None:
    from bidirlm_jax.models.config import ATTENTION_MODES, BIDIRECTIONAL_WINDOWS, DTYPES

    p = sub.add_parser(
        "merge",
        help="linearly merge checkpoints (θ = Σ wᵢθᵢ / Σ wᵢ), streaming from disk",
        description="Linearly merge checkpoints that share a text backbone (mergekit `linear`), tensor by tensor. "
        "The base model (default: the first) gives the output its key layout, config, tokenizer, other files and "
        "the tensors only it has (vision/audio towers).",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH=WEIGHT",
        help="a checkpoint directory and its weight (repeat)",
    )
    p.add_argument(
        "--config",
        type=user_path,
        metavar="FILE.yaml",
        help="a mergekit `merge_method: linear` recipe instead of --model",
    )
    p.add_argument(
        "--out",
        type=user_path,
        required=True,
        metavar="DIR",
        help="output directory (must not exist, unless --overwrite)",
    )
    p.add_argument(
        "--base", metavar="PATH", help="the model whose layout, config, tokenizer and extra tensors the output takes"
    )
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument(
        "--no-normalize", dest="normalize", action="store_false", default=None, help="Σ wᵢθᵢ without dividing by Σ wᵢ"
    )
    p.add_argument(
        "--out-dtype", choices=DTYPES, help="dtype of merged tensors (default: the recipe's `dtype`, else the base's)"
    )
    p.add_argument(
        "--mergekit-arithmetic",
        dest="arithmetic",
        action="store_const",
        const="mergekit",
        help="replay mergekit's arithmetic bit for bit (inputs rounded to the recipe's `dtype` first) "
        "instead of one float32 rounding from the stored values",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="keys not merged: the base's are kept, others dropped",
    )
    p.add_argument(
        "--key-pattern",
        action="append",
        default=[],
        metavar="PATH=REGEX",
        help="regex whose group is the backbone-relative key of PATH's tensors",
    )
    p.add_argument("--attention", choices=ATTENTION_MODES, help="attention mode written to the output's config")
    p.add_argument(
        "--bidirectional-window", choices=BIDIRECTIONAL_WINDOWS, help="Gemma3 sliding layers when bidirectional"
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model.bin inputs (pickle; only from sources you trust)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from bidirlm_jax import merge  # imported here so that `bidirlm --help` stays fast
    from bidirlm_jax.io.shards import parse_size

    spec = merge.spec_from_args(
        models=args.model,
        config=args.config,
        base=args.base,
        normalize=args.normalize,
        out_dtype=args.out_dtype,
        exclude=args.exclude,
        key_patterns=args.key_pattern,
        attention=args.attention,
        bidirectional_window=args.bidirectional_window,
        arithmetic=args.arithmetic,
    )
    result = merge.merge_checkpoints(
        spec,
        args.out,
        overwrite=args.overwrite,
        max_shard_bytes=parse_size(args.max_shard_size),
        progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
    )
    print(
        f"merged {len(result.merged)} tensors, carried {len(result.carried)} from the base, "
        f"dropped {len(result.dropped)} excluded -> {result.out}"
    )
    return 0


_COMMANDS.append(_register_merge)


_TRAIN_USAGE = """usage: bidirlm train --config NAME[:PRESET] --workdir DIR [--config.key=value ...]

Train (or resume from DIR's latest checkpoint) as the config says. Writes DIR/checkpoints/ (orbax),
DIR/tensorboard/ and DIR/metrics.jsonl. --config takes a packaged config by name from any directory
(--config mntp:qwen3-0.6b) or a config file (FILE.py[:PRESET]). Overrides use the config's dotted keys,
e.g. --config.train.steps=100 --config.mesh.fsdp=4 --config.model.init_from=HF_DIR.

Packaged configs (bidirlm_jax/configs/NAME.py) and their presets:"""


def _register_train(sub) -> None:
    # absl parses the arguments (big_vision-style --config.key=value), so argparse passes them all on.
    p = sub.add_parser(
        "train", help="train a model (causal LM, MNTP, contrastive) from a config", prefix_chars="+", add_help=False
    )
    p.add_argument("flags", nargs=argparse.REMAINDER)
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from bidirlm_jax import configs

    if not args.flags or {"-h", "--help"} & set(args.flags):
        print(f"{_TRAIN_USAGE}\n{configs.listing()}", file=sys.stdout if args.flags else sys.stderr)
        return 0 if args.flags else 2
    from bidirlm_jax.train.config import parse_train_args
    from bidirlm_jax.train.loop import train
    from bidirlm_jax.train.runlog import console_logging

    try:
        config, workdir = parse_train_args(configs.resolve_args(args.flags))
    except BidirLMError:
        raise
    except Exception as e:  # parsing runs the user's config file: whatever it raises is the user's to fix
        raise ConfigError(f"cannot load the --config file: {type(e).__name__}: {e}") from None
    with console_logging(all_processes=config.metrics.log_all_processes):
        result = train(config, workdir, ctrl_c_saves=True)  # its log lines say how it ended, where a rerun resumes
    return 130 if result["stopped_by"] == "SIGINT" else 0


_COMMANDS.append(_register_train)


_ABLATE_USAGE = """usage: bidirlm ablate --config configs/ablation.py[:PRESET] --workdir DIR [--config.key=value ...]

The paper's ablation for one base model: build (or take) the variants Base, Bi+Base, Bi+MNTP, Bi+Contrastive,
Bi+MNTP+Contrastive, fine-tune each on each task, and write DIR/results.jsonl, DIR/results.md, DIR/deltas.png
(deltas vs Base, Figure 2) and the merge-ratio sweep DIR/merge_ratio.json, DIR/merge_ratio.png (Figure 4).
Running it again reuses every finished cell. Keys: bidirlm_jax/configs/ablation.py, e.g.
--config.tasks=fruit,docstrings --config.finetune.steps=100 --config.paths.bi_mntp=HF_DIR."""


def _register_ablate(sub) -> None:
    p = sub.add_parser(
        "ablate",
        help="variants x tasks table and merge-ratio sweep (paper Fig. 2, 4)",
        prefix_chars="+",
        add_help=False,
    )
    p.add_argument("flags", nargs=argparse.REMAINDER)
    p.set_defaults(run=_run_ablate)


def _run_ablate(args) -> int:
    if not args.flags or {"-h", "--help"} & set(args.flags):
        print(_ABLATE_USAGE, file=sys.stdout if args.flags else sys.stderr)
        return 0 if args.flags else 2
    from bidirlm_jax import configs
    from bidirlm_jax.ablation.harness import parse_args, run_ablation

    config, workdir = parse_args(configs.resolve_args(args.flags))
    result = run_ablation(config, workdir)
    print()
    print(result.markdown)
    sweep = ", merge_ratio.json, merge_ratio.png" if result.sweep_png else ""
    print(
        f"\n{len(result.computed)} cells computed, {len(result.reused)} reused; in {workdir}/: results.jsonl, results.md, deltas.png{sweep}"
    )
    return 0


_COMMANDS.append(_register_ablate)


def _register_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="tokenise a text corpus once into memory-mappable token shards",
        description="Tokenise SRC (.txt one document per line, .jsonl, .parquet, a directory or glob of them, or "
        "hf:NAME[:CONFIG]) with the checkpoint's tokenizer into OUT: token shards, document offsets and corpus.json. "
        "Training reads OUT memory-mapped (--config.data.path=OUT). An interrupted run resumes when re-run.",
    )
    p.add_argument("src", help="the text corpus")
    p.add_argument("out", type=user_path, help="output directory (must not exist, unless --overwrite)")
    p.add_argument(
        "--tokenizer",
        type=user_path,
        required=True,
        metavar="DIR",
        help="the tokenizer's directory (the HF checkpoint)",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    p.add_argument("--text-field", default="text", help="the .jsonl field / .parquet column of the text (default text)")
    p.add_argument("--split", default="train", help="split of an hf: corpus (default train)")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard, about (default 2**28)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_tokenize)


def _run_tokenize(args: argparse.Namespace) -> int:
    from bidirlm_jax.data.corpus_shards import Corpus, tokenize_corpus

    out = tokenize_corpus(
        args.src,
        args.out,
        args.tokenizer,
        text_field=args.text_field,
        split=args.split,
        num_workers=args.workers,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    corpus = Corpus.load(out)
    print(f"wrote {corpus.num_docs} documents, {corpus.num_tokens} tokens ({corpus.skipped_docs} skipped) -> {out}")
    return 0


_COMMANDS.append(_register_tokenize)


def _register_encoders(sub: argparse._SubParsersAction) -> None:
    from bidirlm_jax.embed.cli import register_embed, register_eval, register_export

    for register in (register_embed, register_export, register_eval):
        register(sub)


_COMMANDS.append(_register_encoders)


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (0 ok, 1 a failed check, 2 a usage or input error, 130 ^C)."""
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error (2) or the help (0)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.run(args) or 0)
    except Preempted as e:  # a pipeline stopped at a run's checkpoint: as `bidirlm train` on SIGTERM
        print(e, file=sys.stderr)
        return 0
    except BidirLMError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:  # a path the user gave: missing, not a directory, not writable, disk full
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
