"""The paper's ablations for one base model: variants × downstream tasks (Figure 2) and the merge-ratio sweep
(Figure 4). `run_ablation(config, workdir)` is `bidirlm ablate`; `merge_ratio_sweep` scores in-memory merges.

    from bidirlm_jax.ablation import run_ablation
    from bidirlm_jax.configs.ablation import get_config

    result = run_ablation(get_config("tiny"), "/tmp/ablation")
    print(result.markdown)            # the table; result.rows, result.deltas_png, result.sweep, result.sweep_png

The names are imported on first use, so importing one module of the package does not import them all.
"""

import importlib

_EXPORTS = {
    "AblationResult": "harness",
    "run_ablation": "harness",
    "merge_ratio_sweep": "sweep",
    "mntp_scorer": "sweep",
    "TASKS": "tasks",
    "Task": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
