"""mergekit's arithmetic replayed (`bidirlm_jax.merge.mergekit_linear`) against mergekit itself, bit for bit."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import yaml

from bidirlm_jax.merge.mergekit_linear import mergekit_linear
from tests.merge.checkpoints import bits, read, run_cli


def _torch(x: np.ndarray):
    import torch

    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def _numpy(t) -> np.ndarray:
    import torch

    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("compute", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.2, 0.5, 0.3], [0.6, 0.9, -0.2, 1.1]])
@pytest.mark.parametrize("normalize", [True, False])
def test_kernel_equals_mergekits(compute, weights, normalize):
    import torch
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.linear import linear_merge

    rng = np.random.default_rng(len(weights))
    xs = [(rng.standard_normal(20_000) * 10.0 ** rng.integers(-3, 4, 20_000)).astype(np.float32) for _ in weights]
    xs[1][:500] = xs[0][:500]  # where the models agree
    for x in xs:
        x[500:600] = -0.0  # signed zeros: mergekit starts from +0
    (theirs,) = linear_merge(
        (TensorGroup.from_tensors([_torch(x) for x in xs]),),
        parameters={"weight": weights, "normalize": normalize},
        dtype=getattr(torch, compute),
    )
    ours = mergekit_linear(xs, weights, normalize=normalize, compute_dtype=np.dtype(compute))
    assert ours.dtype == np.dtype(compute)
    assert np.array_equal(bits(ours), bits(_numpy(theirs)))


def _mergekit(recipe, out) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    run_merge(config, str(out), options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))


@pytest.mark.parametrize(
    "dtype,weights,extra",
    [
        ("bfloat16", [0.5, 0.5], ""),
        ("bfloat16", [0.3, 0.7], ""),
        ("float32", [0.3, 0.7], "out_dtype: float32\n"),  # inputs rounded to bf16 first, output in fp32
    ],
)
def test_same_recipe_as_mergekit(tmp_path, ckpts, dtype, weights, extra):
    """With --mergekit-arithmetic the output is mergekit's bit for bit; by default we round once from the stored
    values (float32 accumulation), which agrees with mergekit at 0.5/0.5 and within a bf16 step otherwise."""
    a, b = ckpts[dtype, 0], ckpts[dtype, 2]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: linear\ndtype: bfloat16\n{extra}models:\n  - model: {a}\n    parameters: {{weight: {weights[0]}}}\n"
        f"  - model: {b}\n    parameters: {{weight: {weights[1]}}}\n"
    )
    _mergekit(recipe, tmp_path / "mergekit")
    theirs = read(tmp_path / "mergekit")
    assert run_cli("--config", str(recipe), "--out", str(tmp_path / "replayed"), "--mergekit-arithmetic") == 0
    replayed = read(tmp_path / "replayed")
    assert set(replayed) == set(theirs)
    for key in theirs:
        assert replayed[key].dtype == theirs[key].dtype and np.array_equal(bits(replayed[key]), bits(theirs[key])), key
    if dtype != "bfloat16":
        return
    assert run_cli("--config", str(recipe), "--out", str(tmp_path / "ours")) == 0
    ours, ta, tb = read(tmp_path / "ours"), read(a), read(b)
    differ = 0
    for key in theirs:
        x, y = ours[key].astype(np.float64), theirs[key].astype(np.float64)
        magnitude = np.maximum(np.abs(ta[key].astype(np.float64)), np.abs(tb[key].astype(np.float64)))
        ulp = np.ldexp(1.0, np.frexp(np.maximum(abs(x), abs(y)))[1] - 8)
        assert np.all(np.abs(x - y) <= ulp + 2**-21 * magnitude), key  # one bf16 step, plus cancellation
        differ += int(np.sum(x != y))
    assert (differ == 0) == (weights == [0.5, 0.5])  # the default is not mergekit's arithmetic
