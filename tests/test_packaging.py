"""`pip install .[test]` must give the suite everything `requirements.lock` gives it: every third-party module
that the tests, the notebooks they run and the package import (lazily or not) belongs to a distribution that
the package's dependencies or its `test` extra name, and that `requirements.lock` pins. Parsed, not copied, so
the two lists cannot drift apart again."""

import ast
import importlib.metadata
import json
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"bidirlm_jax", "tests"}


def normalize(name: str) -> str:
    """PEP 503: `pytrec_eval-terrier` and `pytrec-eval-terrier` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> tuple[str, list[str]]:
    """`"bidirlm-jax[torch]"` → ("bidirlm-jax", ["torch"]); `"torch>=2.13"` → ("torch", [])."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", spec)
    extras = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    return normalize(match.group(1)), extras


def declared_distributions() -> set[str]:
    """The distributions `pip install .[test]` installs directly: the dependencies, the `test` extra and the
    extras it names of this project itself (`bidirlm-jax[torch]`), followed recursively."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    self_name = normalize(project["name"])
    found = {requirement_name(s)[0] for s in project["dependencies"]}
    todo, seen = ["test"], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for spec in extras[extra]:
            name, sub = requirement_name(spec)
            if name == self_name:
                todo.extend(sub)
            else:
                found.add(name)
    return found


def locked_distributions() -> set[str]:
    lines = (REPO / "requirements.lock").read_text().splitlines()
    return {normalize(line.split("==")[0]) for line in lines if "==" in line and not line.lstrip().startswith("#")}


def _modules(source: str) -> set[str]:
    """Top-level modules a source imports anywhere (functions included) or asks `pytest.importorskip` for."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "importorskip"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(str(node.args[0].value).split(".")[0])
    return found


def _notebook_sources(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return "\n".join(line for cell in code for line in cell.splitlines() if not line.lstrip().startswith(("%", "!")))


def imported_modules() -> set[str]:
    sources = [p.read_text() for p in (REPO / "tests").rglob("*.py")]
    sources += [p.read_text() for p in (REPO / "bidirlm_jax").rglob("*.py")]
    sources += [_notebook_sources(p) for p in (REPO / "notebooks").glob("*.ipynb")]
    modules = set().union(*map(_modules, sources))
    return {m for m in modules if m not in sys.stdlib_module_names and m not in FIRST_PARTY}


def test_every_imported_package_is_in_the_test_extra_and_the_lock():
    owners = importlib.metadata.packages_distributions()
    declared, locked = declared_distributions(), locked_distributions()
    missing_extra, missing_lock = [], []
    for module in sorted(imported_modules()):
        candidates = {normalize(d) for d in owners.get(module, [module])}
        if not candidates & declared:
            missing_extra.append(f"{module} ({', '.join(sorted(candidates))})")
        if not candidates & locked:
            missing_lock.append(f"{module} ({', '.join(sorted(candidates))})")
    assert not missing_extra, (
        f"imported by the tests / notebooks / package but not in pyproject's test extra: {missing_extra}"
    )
    assert not missing_lock, (
        f"imported by the tests / notebooks / package but not pinned in requirements.lock: {missing_lock}"
    )


def test_the_lock_pins_every_declared_distribution():
    """What the extra installs, `make` (which installs from the lock) installs too, at a tested version."""
    assert declared_distributions() - locked_distributions() == set()


def test_the_scan_sees_the_imports_it_guards():
    """The scan is not vacuous: it finds packages the suite is known to need, including lazy and skipped ones."""
    modules = imported_modules()
    assert {"pytrec_eval", "nbclient", "nbformat", "ipykernel", "mergekit", "torch", "jax"} <= modules
    assert not modules & {"os", "json", "bidirlm_jax", "tests"}
