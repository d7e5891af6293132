"""The `bidirlm` command. Each subcommand is a thin shell over one function of the Python API.

Failures the user caused (a `BidirLMError`, a bad path, a usage error) print one `error: ...` line without
a traceback and exit with status 2; Ctrl-C exits with 130 (`bidirlm train` saves a checkpoint first; a second
Ctrl-C stops it at once). A preemption (SIGTERM) exits with 0 after a training run saved its checkpoint,
whichever command was training (`errors.Preempted`): the same command resumes it.

Every command runs with JAX's persistent compilation cache (`bidirlm_jax.compilation_cache`): a second run
reads the programs the first compiled. `bidirlm --compilation-cache DIR|off COMMAND ...` or
`$BIDIRLM_COMPILATION_CACHE` chooses where, or switches it off.

`COMMANDS` is the one command table: name → (add its parser to the subparsers, run it on the parsed
arguments). Each command group is one module; heavy imports happen inside the runs, so `bidirlm --help`
stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from bidirlm_jax.cli import checkpoints, encoders, studies, training
from bidirlm_jax.compilation_cache import ENV, enable_compilation_cache
from bidirlm_jax.errors import BidirLMError, Preempted

AddParser = Callable[[argparse._SubParsersAction, str], argparse.ArgumentParser]
Run = Callable[[argparse.Namespace], int]

COMMANDS: dict[str, tuple[AddParser, Run]] = {
    "convert": (checkpoints.add_convert, checkpoints.run_convert),
    "demo": (studies.add_demo, studies.run_demo),
    "merge": (checkpoints.add_merge, checkpoints.run_merge),
    "train": (training.add_train, training.run_train),
    "ablate": (studies.add_ablate, studies.run_ablate),
    "tokenize": (training.add_tokenize, training.run_tokenize),
    "embed": (encoders.add_embed, encoders.run_embed),
    "export": (encoders.add_export, encoders.run_export),
    "eval": (encoders.add_eval, encoders.run_eval),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bidirlm", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--compilation-cache",
        metavar="DIR|off",
        help=f"where compiled programs are kept between runs (default: ${ENV}, else ~/.cache/bidirlm_jax/jax)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, run) in COMMANDS.items():
        add(sub, name).set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (0 ok, 1 a failed check, 2 a usage or input error, 130 ^C)."""
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage error (2) or the help (0)
        return e.code if isinstance(e.code, int) else 2
    try:
        enable_compilation_cache(args.compilation_cache)
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
