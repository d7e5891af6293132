"""`bidirlm tokenize` and `bidirlm train`: a corpus into token shards, a config into a training run."""

from __future__ import annotations

import argparse
import sys

from bidirlm_jax.errors import BidirLMError, ConfigError
from bidirlm_jax.paths import user_path


def add_tokenize(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
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
    return p


def run_tokenize(args: argparse.Namespace) -> int:
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


_TRAIN_USAGE = """usage: bidirlm train --config NAME[:PRESET] --workdir DIR [--config.key=value ...]

Train (or resume from DIR's latest checkpoint) as the config says. Writes DIR/checkpoints/ (orbax),
DIR/tensorboard/ and DIR/metrics.jsonl. --config takes a packaged config by name from any directory
(--config mntp:qwen3-0.6b) or a config file (FILE.py[:PRESET]). Overrides use the config's dotted keys,
e.g. --config.train.steps=100 --config.mesh.fsdp=4 --config.model.init_from=HF_DIR.

Packaged configs (bidirlm_jax/configs/NAME.py) and their presets:"""


def add_train(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    # absl parses the arguments (big_vision-style --config.key=value), so argparse passes them all on.
    p = sub.add_parser(
        name, help="train a model (causal LM, MNTP, contrastive) from a config", prefix_chars="+", add_help=False
    )
    p.add_argument("flags", nargs=argparse.REMAINDER)
    return p


def run_train(args: argparse.Namespace) -> int:
    from bidirlm_jax import configs

    if not args.flags or {"-h", "--help"} & set(args.flags):
        print(f"{_TRAIN_USAGE}\n{configs.listing()}", file=sys.stdout if args.flags else sys.stderr)
        return 0 if args.flags else 2
    from bidirlm_jax.evals.registry import EVALUATORS
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
        result = train(
            config, workdir, ctrl_c_saves=True, evaluators=EVALUATORS
        )  # its log lines say how it ended, where a rerun resumes
    return 130 if result["stopped_by"] == "SIGINT" else 0
