"""`losses/` sits below `train/` and `evals/`, and evaluation imports no training (imports inside functions
count): otherwise held-out scoring would pull in the engine, and the two rooms would import each other."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bidirlm_jax"


def _imports(room: str) -> set[tuple[str, str]]:
    """(file, imported module) for every absolute import in `bidirlm_jax/<room>/`."""
    found = set()
    for path in (PACKAGE / room).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update((path.name, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update((path.name, f"{node.module}.{a.name}") for a in node.names)
    return found


@pytest.mark.parametrize(
    ("room", "forbidden"),
    [
        ("losses", ("bidirlm_jax.train", "bidirlm_jax.evals")),
        ("evals", ("bidirlm_jax.train",)),
        ("train", ("bidirlm_jax.evals",)),  # evaluations reach the loop as a registry its caller passes
    ],
)
def test_room_imports_nothing_above_it(room, forbidden):
    imports = _imports(room)
    assert any(m.startswith("bidirlm_jax.") for _, m in imports)  # the scan sees the room's imports
    assert sorted((f, m) for f, m in imports if m.startswith(forbidden)) == []


def test_the_loop_imports_no_objective_module_by_name():
    loop = ast.parse((PACKAGE / "train" / "loop.py").read_text())
    names = {a.name for n in ast.walk(loop) if isinstance(n, ast.ImportFrom) for a in n.names}
    names |= {n.module for n in ast.walk(loop) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {"finetune", "bidirlm_jax.train.objectives.finetune"} & names
