"""The `bidirlm` command. Each subcommand is a thin shell over one function of the Python API.

A `BidirLMError` is printed as `error: ...` without a traceback and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from bidirlm_jax.errors import BidirLMError


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bidirlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _COMMANDS:
        register(sub)
    return parser


_COMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except BidirLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
