"""The standard library's module docstrings: real text on every machine, deterministic, nothing imported."""

import sys

from bidirlm_jax.data.stdlib_text import stdlib_docstrings


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


def test_mined_pairs_never_use_a_positive_as_its_own_hard_negative():
    from bidirlm_jax.data.stdlib_text import stdlib_pairs

    datasets, instructions = stdlib_pairs(num_negatives=2)
    assert {d.name for d in datasets} == set(instructions) == {"summaries", "halves"}
    for d in datasets:
        assert len(set(d.positives)) == len(d.positives)  # modules sharing one docstring appear once
        assert all(p not in negatives for p, negatives in zip(d.positives, d.negatives))
