"""The public API: every name in `bidirlm_jax.__all__` is what it says, and importing the package is cheap."""

import inspect
import pkgutil
import sys

import pytest

import bidirlm_jax
from tests import procs

CALLABLES = [name for name in bidirlm_jax.__all__ if name != "PRESETS"]


def test_dir_is_all():
    assert dir(bidirlm_jax) == sorted(bidirlm_jax.__all__)
    assert len(set(bidirlm_jax.__all__)) == len(bidirlm_jax.__all__)


@pytest.mark.parametrize("name", CALLABLES)
def test_each_public_name_is_a_documented_function_or_class_of_that_name(name):
    obj = getattr(bidirlm_jax, name)
    assert inspect.isfunction(obj) or inspect.isclass(obj), f"{name} is a {type(obj).__name__}"
    assert obj.__name__ == name and obj.__module__.startswith("bidirlm_jax.")
    doc = obj.__doc__ or ""
    assert doc.strip() and not doc.startswith(f"{name}("), f"{name} has no docstring of its own"


def test_presets_map_names_to_model_configs():
    assert bidirlm_jax.PRESETS and all(
        isinstance(c, bidirlm_jax.ModelConfig) and bidirlm_jax.get_preset(n) == c
        for n, c in bidirlm_jax.PRESETS.items()
    )


def test_no_public_name_is_also_a_submodule():
    """`import bidirlm_jax.X` would rebind the public name X to the module."""
    submodules = {m.name for m in pkgutil.iter_modules(bidirlm_jax.__path__)}
    assert not submodules & set(bidirlm_jax.__all__)


def _run(code: str) -> str:
    result = procs.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_convert_stays_the_function_after_importing_the_conversion_module():
    code = "import bidirlm_jax.io.conversion, bidirlm_jax, inspect; print(inspect.isfunction(bidirlm_jax.convert))"
    assert _run(code) == "True"


@pytest.mark.parametrize("module", ["bidirlm_jax", "bidirlm_jax.cli"])
def test_importing_the_package_or_the_cli_loads_no_heavy_module(module):
    heavy = {"jax", "jaxlib", "flax", "optax", "orbax", "torch", "transformers", "safetensors", "grain", "datasets"}
    code = f"import sys, {module}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r}))"
    assert _run(code) == "[]"
