"""The ml_collections configs of `bidirlm train`, shipped inside the package.

They live here, not only in the repository, so that `bidirlm demo`, notebooks and a pip-installed user
find them; `configs/*.py` at the repository root re-export them. `--config` takes `NAME[:PRESET]`
(`mntp:qwen3-0.6b` is this package's `mntp.py`) from any directory, or a path to a config file;
`configs/NAME.py` falls back to the packaged file when the working directory has no such file.
"""

from __future__ import annotations

import importlib
from pathlib import Path

_HERE = Path(__file__).resolve().parent


# What a short smoke run of a paper preset on one CPU overrides (README "Smoke runs"): two steps of three
# short rows — one per micro-batch of the presets' 3, so the batch split is exercised — a warmup shorter
# than the run, the built-in text (a BPE of the preset's vocabulary is trained on it) instead of a corpus.
_SMOKE = ["--config.train.steps=2", "--config.train.checkpoint_every=2", "--config.optim.warmup_steps=1"]
SMOKE = {
    "lm": [*_SMOKE, "--config.data.source=synthetic", "--config.data.seq_len=64", "--config.data.global_batch_size=3"],
    "mntp": [*_SMOKE, "--config.data.source=stdlib", "--config.data.seq_len=64", "--config.data.global_batch_size=3"],
    "contrastive": [
        *_SMOKE,
        "--config.data.source=stdlib",
        "--config.data.seq_len=32",
        "--config.data.global_batch_size=4",
        "--config.contrastive.chunk_size=2",
        "--config.contrastive.num_negatives=1",
    ],
}


_NOT_CONFIGS = {"sizes"}  # the tiny pipeline's sizes, which configs are built from: no `get_config`


def names() -> list[str]:
    """The packaged config files, by name (`lm`, `mntp`, ...)."""
    return sorted(p.stem for p in _HERE.glob("*.py") if not p.stem.startswith("_") and p.stem not in _NOT_CONFIGS)


def resolve(spec: str) -> str:
    """`--config`'s value → a config file path with its `:PRESET`: an existing file as given, else a
    packaged config named `NAME` or `configs/NAME.py` (the repository's re-exports)."""
    file, sep, preset = spec.partition(":")
    if Path(file).expanduser().is_file():
        return str(Path(file).expanduser()) + sep + preset
    relative = Path(file)
    name = relative.stem if file.endswith(".py") and str(relative.parent) in ("configs", ".") else file
    if name in names():
        return str(_HERE / f"{name}.py") + sep + preset
    return spec  # config_flags reports the missing file by its name


def resolve_args(argv: list[str]) -> list[str]:
    """A command line with its `--config NAME[:PRESET]` / `--config=...` value `resolve`d."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg.removeprefix("--config="))
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out


def listing() -> str:
    """One line per packaged config: its name and presets, for `bidirlm train --help`."""
    lines = []
    for name in names():
        module = importlib.import_module(f"{__name__}.{name}")
        command = getattr(module, "COMMAND", "train")
        note = f"  (bidirlm {command})" if command != "train" else ""
        lines.append(f"  {name:<12} {', '.join(getattr(module, 'PRESETS', ()))}{note}")
    return "\n".join(lines)
