"""The notebooks (`notebooks/*.ipynb`) run top to bottom in their small mode (`BIDIRLM_SMALL=1`), offline, in
a kernel of this interpreter, and draw their plots from the run; the repository holds them without outputs."""

import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("quickstart", "forgetting", "merge_ratio", "ablations")
KERNEL = "bidirlm-notebook-tests"


def test_every_notebook_is_tested_and_stored_without_outputs():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), f"{name}: strip its outputs"
        assert nb.cells[0].cell_type == "markdown" and "BIDIRLM_SMALL=1" in nb.cells[0].source, name


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernel spec that runs this interpreter (not whatever `python3` kernel the machine has)."""
    root = tmp_path_factory.mktemp("jupyter")
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    write_kernel_spec(root / "kernels" / KERNEL, overrides={"argv": argv})
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root)
    yield KERNEL
    if old is None:
        del os.environ["JUPYTER_PATH"]
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_small_mode(name, kernel, tmp_path):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user's kernel has
    env.update(BIDIRLM_SMALL="1", BIDIRLM_WORKDIR=str(tmp_path / "work"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    client = NotebookClient(
        nb, timeout=600, kernel_name=kernel, resources={"metadata": {"path": str(NOTEBOOKS)}}, allow_errors=False
    )
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    print(f"{name}: {time.perf_counter() - start:.0f}s")
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} drew no plot"
