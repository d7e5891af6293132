"""The standard library's module docstrings: real text on every machine, deterministic, nothing imported."""

import sys

from bidirlm_jax.data.corpora import stdlib_docstrings


def test_stdlib_docstrings():
    before = set(sys.modules)
    docs = stdlib_docstrings()
    assert not {"antigravity", "this", "tkinter", "turtle"} & (set(sys.modules) - before)  # parsed, not imported
    names = [name for name, _ in docs]
    assert len(docs) > 200 and sum(len(doc) for _, doc in docs) > 100_000
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "JSON" in dict(docs)["json"] and "asyncio.tasks" in names  # modules and submodules
    assert not [n for n in names if n.split(".")[0] in {"test", "idlelib", "tkinter", "turtle", "this"}]
    assert all(isinstance(doc, str) and doc.strip() for _, doc in docs)
    again = stdlib_docstrings()
    assert again == docs and again is not docs  # cached, but callers get their own list
