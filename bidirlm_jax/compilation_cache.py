"""JAX's persistent compilation cache for the CLI and notebooks: a compiled program is written to disk once
and read back by every later process, so a second `bidirlm embed` (or notebook kernel) skips compiling.

Where it goes, first match wins: the path given (the CLI's `--compilation-cache`), `$BIDIRLM_COMPILATION_CACHE`,
a directory jax was already given (`JAX_COMPILATION_CACHE_DIR` or `jax_compilation_cache_dir`), then
`$XDG_CACHE_HOME/bidirlm_jax/jax` (`~/.cache/...`). `off` (or `0`, `false`, `no`) switches caching off for the
process. Before jax is imported the settings go into the environment jax reads at import (the CLI does not pay
for importing jax, and the processes it starts inherit them); afterwards into `jax.config`. The cache is trusted
code: keep it in a directory only you can write.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bidirlm_jax.paths import user_path

ENV = "BIDIRLM_COMPILATION_CACHE"
OFF = frozenset({"off", "0", "false", "no"})
# jax writes only programs that took at least this long to compile (its default, 1 s, skips most of encode's
# and the tiny presets' CPU programs). Reading an entry back costs a few milliseconds, a write about as much,
# so anything slower than that gains; below it the cache would only fill up with trivial programs.
MIN_COMPILE_SECS = 0.05


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/bidirlm_jax/jax`, or `~/.cache/bidirlm_jax/jax`."""
    base = os.environ.get("XDG_CACHE_HOME") or user_path("~/.cache")
    return Path(base) / "bidirlm_jax" / "jax"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache for this process; return its directory (None when switched
    off). `path` (a directory, or `"off"`) overrides `$BIDIRLM_COMPILATION_CACHE`; see the module docstring."""
    choice = os.fspath(path) if path is not None else os.environ.get(ENV, "").strip()
    if choice.lower() in OFF:
        _apply({"jax_enable_compilation_cache": False})
        return None
    directory = user_path(choice) if choice else _configured() or default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    settings: dict[str, object] = {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": str(directory)}
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's own threshold stands
        settings["jax_persistent_cache_min_compile_time_secs"] = MIN_COMPILE_SECS
    _apply(settings)
    return directory


def _configured() -> Path | None:
    """The directory jax was already told to use, if any."""
    if "jax" in sys.modules:
        import jax

        configured = jax.config.jax_compilation_cache_dir
    else:
        configured = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return user_path(configured) if configured else None


def _apply(settings: dict[str, object]) -> None:
    if "jax" in sys.modules:
        import jax
        from jax.experimental.compilation_cache import compilation_cache

        for key, value in settings.items():
            jax.config.update(key, value)
        compilation_cache.reset_cache()  # jax builds its cache once per process: let the next compile rebuild it
    else:  # read by jax at import
        for key, value in settings.items():
            os.environ[key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
