"""The recipe (`bidirlm_jax.merge.spec`): mergekit YAML in, the same merge out, records mergekit accepts."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from bidirlm_jax import cli
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.merge import MergeModel, MergeSpec, load_merge_yaml, spec_from_args
from tests.merge.checkpoints import bits, merge, read, run_cli


def _recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return path


def test_mergekit_yaml_config(tmp_path, ckpts):
    from mergekit.config import MergeConfiguration

    a, b = ckpts["bfloat16", 0], ckpts["bfloat16", 1]
    recipe = _recipe(
        tmp_path,
        f"models:\n  - model: {a}\n    parameters:\n      weight: 0.3\n  - model: {b}\n    parameters:\n      weight: 0.7\n"
        "merge_method: linear\nparameters:\n  normalize: true\ndtype: float32\nout_dtype: bfloat16\n",
    )
    assert cli.main(["merge", "--config", str(recipe), "--out", str(tmp_path / "yaml"), "--no-progress"]) == 0
    from_flags = merge(tmp_path, [a, b], [0.3, 0.7])
    yaml_out, flags_out = read(tmp_path / "yaml"), read(from_flags)
    assert all(np.array_equal(bits(yaml_out[k]), bits(flags_out[k])) for k in flags_out)
    record = (tmp_path / "yaml" / "mergekit_config.yml").read_text()
    MergeConfiguration.model_validate(yaml.safe_load(record))  # mergekit itself accepts the record
    # and running the record again reproduces the merge
    assert run_cli("--config", str(tmp_path / "yaml" / "mergekit_config.yml"), "--out", str(tmp_path / "again")) == 0
    again = read(tmp_path / "again")
    assert all(np.array_equal(bits(again[k]), bits(flags_out[k])) for k in flags_out)


def test_dtype_is_mergekits_compute_dtype(tmp_path):
    """`dtype:` names the output only without `out_dtype:`; it is the arithmetic's only with mergekit's."""
    models = "models:\n  - model: a\n    parameters: {weight: 0.3}\n  - model: b\n    parameters: {weight: 0.7}\n"
    spec = load_merge_yaml(_recipe(tmp_path, f"merge_method: linear\n{models}dtype: bfloat16\n"))
    assert (spec.dtype, spec.out_dtype, spec.output_dtype, spec.arithmetic) == ("bfloat16", None, "bfloat16", "float32")
    spec = load_merge_yaml(_recipe(tmp_path, f"merge_method: linear\n{models}dtype: bf16\nout_dtype: float32\n"))
    assert (spec.dtype, spec.output_dtype) == ("bfloat16", "float32")
    assert yaml.safe_load(spec.to_yaml())["dtype"] == "float32"  # what our arithmetic did
    flagged = spec_from_args(config=str(tmp_path / "recipe.yml"), arithmetic="mergekit")
    record = yaml.safe_load(flagged.to_yaml())
    assert (record["dtype"], record["out_dtype"], record["bidirlm"]) == (
        "bfloat16",
        "float32",
        {"arithmetic": "mergekit"},
    )
    again = load_merge_yaml(_recipe(tmp_path, flagged.to_yaml()))
    assert (again.dtype, again.out_dtype, again.arithmetic) == ("bfloat16", "float32", "mergekit")
    with pytest.raises(ConfigError, match="arithmetic must be one of float32, mergekit"):
        MergeSpec((MergeModel("a", 1),), arithmetic="torch")


@pytest.mark.parametrize(
    "recipe,message",
    [
        ("merge_method: ties\nmodels:\n  - model: {a}\n", "merge_method 'ties'"),
        ("merge_method: linear\nmodels:\n  - model: {a}\n", "no parameters.weight"),
        ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight: [0, 1]\n", "single number"),
        ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\nslerp_t: 1\n", "slerp_t"),
        (
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\ntokenizer:\n  source: union\n",
            "tokenizer",
        ),
        ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\ndtype: int8\n", "int8"),
    ],
)
def test_mergekit_yaml_refusals(tmp_path, ckpts, capsys, recipe, message):
    path = _recipe(tmp_path, recipe.format(a=ckpts["float32", 0]))
    assert cli.main(["merge", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()
