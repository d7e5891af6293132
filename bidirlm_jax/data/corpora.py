"""Real English text that every machine has: the module docstrings of Python's standard library.

`tiny` presets, tests and the demo train a small tokenizer on it, pack it and mask it, offline. The
docstrings are read from the running interpreter's source files without importing anything (no side
effects): `tokenize` finds each module's first statement and `ast.literal_eval` reads it if it is a
string. About 400 documents and 190 kB, in a tenth of a second; parsing whole files for the docstrings of
every function too would cost several seconds.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import sysconfig
import tokenize
from pathlib import Path

# Tests, GUI and demo packages, and Python 2 sources that the running interpreter cannot read.
_SKIP = {
    "antigravity", "ensurepip", "idle_test", "idlelib", "lib2to3", "site-packages", "test", "tests", "this",
    "tkinter", "turtle", "turtledemo",
}  # fmt: skip
_PREAMBLE = {tokenize.ENCODING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE}


def stdlib_docstrings() -> list[tuple[str, str]]:
    """`(module name, docstring)` for each documented public standard-library module, sorted by name."""
    return list(_stdlib_docstrings())


@functools.cache
def _stdlib_docstrings() -> tuple[tuple[str, str], ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in _module_files(root):
        doc = _module_docstring(path)
        if doc:
            parts = path.relative_to(root).with_suffix("").parts
            docs.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), doc))
    return tuple(sorted(docs))


def _module_files(root: Path) -> list[Path]:
    files = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP:
            continue
        if (root / f"{name}.py").is_file():
            files.append(root / f"{name}.py")
        elif (root / name / "__init__.py").is_file():
            files += [p for p in sorted((root / name).rglob("*.py")) if not _SKIP & set(p.relative_to(root).parts)]
    return files


def _module_docstring(path: Path) -> str | None:
    """The module's docstring, read from its first statement without parsing the rest of the file."""
    try:
        with path.open("rb") as f:
            for token in tokenize.tokenize(f.readline):
                if token.type not in _PREAMBLE:
                    value = ast.literal_eval(token.string) if token.type == tokenize.STRING else None
                    return inspect.cleandoc(value) if isinstance(value, str) else None
    except (SyntaxError, ValueError, tokenize.TokenError, UnicodeDecodeError):
        return None
    return None
