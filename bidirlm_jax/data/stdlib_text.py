"""Real English text that every machine has: the module docstrings of Python's standard library.

`tiny` presets, tests and the demo train a small tokenizer on it, pack it and mask it, offline. The
docstrings are read from the running interpreter's source files without importing anything (no side
effects): `tokenize` finds each module's first statement and `ast.literal_eval` reads it if it is a
string. About 400 documents and 190 kB, in a tenth of a second; parsing whole files for the docstrings of
every function too would cost several seconds. `stdlib_code` gives the same modules' functions and
classes as source code, a second domain.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import sysconfig
import tokenize
from collections.abc import Callable
from pathlib import Path

from bidirlm_jax.errors import ConfigError

# Tests, GUI and demo packages, and Python 2 sources that the running interpreter cannot read.
_SKIP = {
    "antigravity",
    "ensurepip",
    "idle_test",
    "idlelib",
    "lib2to3",
    "site-packages",
    "test",
    "tests",
    "this",
    "tkinter",
    "turtle",
    "turtledemo",
}
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


def stdlib_code(*, max_chars: int = 2000) -> list[tuple[str, str]]:
    """`(module name, source)` for each top-level function and class of the same modules, in module order, each
    cut at `max_chars`: a second domain (code) beside the docstrings' prose, for mixtures and forgetting
    studies offline. Blocks are split at lines that start a `def`, `async def`, `class` or decorator, without
    parsing (a fraction of a second)."""
    return [(m, block[:max_chars]) for m, block in _stdlib_code()]


@functools.cache
def _stdlib_code() -> tuple[tuple[str, str], ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    blocks = []
    for path in _module_files(root):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        current: list[str] | None = None
        for line in lines:
            if line.startswith(_BLOCK_STARTS) and not (current and current[-1].startswith("@")):
                if current:
                    blocks.append((module, "\n".join(current).strip()))
                current = [line]
            elif current is not None and (not line or line[0] in " \t#)]}"):
                current.append(line)
            elif current is not None:  # module-level code after a block ends it
                blocks.append((module, "\n".join(current).strip()))
                current = None
        if current:
            blocks.append((module, "\n".join(current).strip()))
    return tuple(blocks)


_BLOCK_STARTS = ("def ", "async def ", "class ", "@")


def stdlib_pairs(*, num_negatives: int = 1, exclude: Callable[[str], bool] | None = None) -> tuple[list, dict]:
    """Contrastive datasets mined from the same docstrings, and their instructions, for `tiny` presets and
    the demo: `summaries` (asymmetric retrieval: a module's summary line → the rest of its docstring) and
    `halves` (symmetric: the first half of a docstring's body ↔ its second half). Hard negatives are the
    matching texts of the modules that sort next to it (the same package first: the closest topics).
    `exclude(module)` holds modules out (e.g. for evaluation)."""
    from bidirlm_jax.data.pairs import Instruction, PairDataset  # pairs needs transformers; corpora does not

    docs = [(m, *_summary_and_body(d)) for m, d in stdlib_docstrings() if not (exclude and exclude(m))]
    unique = {b: (m, s, b) for m, s, b in reversed(docs) if s and len(b) >= 200}  # modules sharing a docstring
    docs = sorted(unique.values())  # (importlib._bootstrap{,_external}) would be each other's false negatives
    if len(docs) <= num_negatives:
        raise ConfigError(f"only {len(docs)} standard-library modules are left to mine pairs from")
    halves = [(b[: len(b) // 2], b[len(b) // 2 :]) for _, _, b in docs]
    sets = {"summaries": [(s, b) for _, s, b in docs], "halves": halves}
    datasets = []
    for name, pairs in sets.items():
        ds = PairDataset(name=name, sources=["python standard library"])
        for i, (query, positive) in enumerate(pairs):
            near = sorted(range(len(pairs)), key=lambda j: (abs(j - i) if j != i else len(pairs), j))
            ds.queries.append(query)
            ds.positives.append(positive)
            ds.negatives.append([pairs[j][1] for j in near[:num_negatives]])
            ds.where.append(f"{name}:{docs[i][0]}")
        datasets.append(ds)
    instructions = {
        "summaries": Instruction("Given a one-line summary of a Python module, retrieve its documentation"),
        "halves": Instruction("Retrieve semantically similar text", symmetric=True),
    }
    return datasets, instructions


def _summary_and_body(doc: str) -> tuple[str, str]:
    summary, _, body = doc.partition("\n")
    return summary.strip(), body.strip()
