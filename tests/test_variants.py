"""`bidirlm_jax.pipeline.variants`: the paper's variants from one causal base, at a tiny scale (a few steps each).

What matters is the wiring, not the quality: each variant's attention mode (in its object and its config.json),
Bi+Base holding the base's weights bit for bit, the merge being the average, each trained variant starting
from the variant it should, the tokenizer carried along, finished variants reused (never silently with
other settings), and a preempted build recording nothing and resuming its run.
"""

import json
import shutil

import numpy as np
import pytest

from bidirlm_jax.errors import ConfigError, Preempted
from bidirlm_jax.pipeline import stages
from bidirlm_jax.pipeline import variants as v
from bidirlm_jax.testing.tolerance import merge_tol
from tests.runs import sigterm_at


def _params(path, attention):
    from flax import nnx

    from bidirlm_jax.io.hf import from_pretrained

    model = from_pretrained(path, attention=attention)
    return {"/".join(map(str, k)): np.asarray(x[...]) for k, x in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _recipe(**changes):
    recipe = v.Recipe(**changes)
    for config in (recipe.mntp, recipe.contrastive):
        config.data.update(global_batch_size=8)
        config.train.update(steps=2, checkpoint_every=2, log_every=1)
        config.metrics.progress_bar = False
    recipe.mntp.data.seq_len = 32
    recipe.contrastive.data.seq_len = 32
    return recipe


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random tiny causal Gemma3 in HF format with a BPE tokenizer (with <mask>) trained on the stdlib."""
    from flax import nnx

    from bidirlm_jax.data.stdlib_text import stdlib_docstrings
    from bidirlm_jax.io.companions import companion_files
    from bidirlm_jax.io.hf import save_pretrained
    from bidirlm_jax.io.tokenizer import train_tokenizer
    from bidirlm_jax.models.presets import get_preset
    from bidirlm_jax.models.transformer import Transformer

    root = tmp_path_factory.mktemp("variants")
    train_tokenizer((d for _, d in stdlib_docstrings()), 512, root / "tokenizer")
    model = Transformer(get_preset("tiny-gemma3"), rngs=nnx.Rngs(0))
    return save_pretrained(model, root / "base", extra_files=companion_files(root / "tokenizer"))


@pytest.fixture(scope="module")
def preempted(base_dir, tmp_path_factory):
    """A first build of every variant, stopped by SIGTERM during Bi+MNTP's run (`built` resumes it): the exception
    and what the output directory held then."""
    from bidirlm_jax.train.checkpoints import latest_step

    out = tmp_path_factory.mktemp("built")
    run = out / "runs" / "mntp"
    with pytest.MonkeyPatch.context() as m:
        sigterm_at(m, step=1)
        with pytest.raises(Preempted) as stop:
            v.build_variants(base_dir, out, _recipe())
    manifest = json.loads((out / v.MANIFEST).read_text())
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    entries = sorted(p.relative_to(out).as_posix() for p in [*out.iterdir(), *(out / "runs").iterdir()])
    return out, stop.value, entries, manifest, latest_step(run / "checkpoints"), metrics


@pytest.fixture(scope="module")
def built(preempted, base_dir):
    out = preempted[0]
    phases = []
    result = v.build_variants(base_dir, out, _recipe(), on_phase=lambda n, _, s: phases.append((n, s)))
    return out, result, phases


def test_every_variant_in_its_attention_mode(built, base_dir):
    from bidirlm_jax.io.hf_config import read_runtime

    out, result, phases = built
    assert list(result) == list(v.VARIANTS) and [n for n, _ in phases] == list(v.VARIANTS)
    assert result["Base"].path == base_dir.resolve() and result["Base"].attention == "causal"
    for name in v.VARIANTS[1:]:
        variant = result[name]
        assert variant.attention == "bidirectional" and variant.path == out / v.DIRECTORIES[name]
        assert read_runtime(variant.path).attention == "bidirectional"  # the directory says so itself
        assert variant.tokenizer().mask_token == "<mask>"
    assert read_runtime(base_dir).attention == "causal"


def test_a_preempted_variant_is_neither_exported_nor_recorded(preempted, built):
    """The preempted build stopped at Bi+MNTP's checkpoint with nothing exported or recorded for it (nor started
    after it); the next build resumed that run — its first step was not trained again — and finished it."""
    out, stop, entries, manifest, step, first = preempted
    run = out / "runs" / "mntp"
    assert stop.workdir == run and stop.step == 1
    assert f"after step 1; nothing was recorded: checkpoint saved in {run}" in str(stop)
    assert entries == ["bi-base", "runs", "runs/mntp", v.MANIFEST] and list(manifest) == ["Bi+Base"] and step == 1
    assert [json.loads(line)["step"] for line in first] == [1]
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert rows[0] == first[0] and [json.loads(line)["step"] for line in rows] == [1, 2]
    assert built[1]["Bi+MNTP"].path == out / "bi-mntp" and "Bi+MNTP" in json.loads((out / v.MANIFEST).read_text())


def test_bi_base_is_the_base_bit_for_bit(built, base_dir):
    _, result, _ = built
    base = _params(base_dir, "causal")
    bi = _params(result["Bi+Base"].path, "bidirectional")
    assert base.keys() == bi.keys()
    for key in base:
        np.testing.assert_array_equal(bi[key], base[key], err_msg=key)
    assert (result["Bi+Base"].path / "model.safetensors").read_bytes() == (base_dir / "model.safetensors").read_bytes()


def test_the_merge_is_the_average_of_bi_mntp_and_the_base(built, base_dir):
    _, result, _ = built
    base = _params(base_dir, "causal")
    mntp = _params(result["Bi+MNTP"].path, "bidirectional")
    merged = _params(result["Bi+MNTP+Merge"].path, "bidirectional")
    assert any(not np.array_equal(mntp[k], base[k]) for k in base)  # MNTP trained
    for key in base:
        expected = 0.5 * (mntp[key].astype(np.float64) + base[key])
        assert (np.abs(merged[key] - expected) <= merge_tol(mntp[key], base[key])).all(), key


def test_trained_variants_start_where_they_should(built, base_dir):
    out, result, _ = built
    manifest = json.loads((out / v.MANIFEST).read_text())
    assert {n: manifest[n]["parent"] for n in manifest} == {
        "Bi+Base": "Base",
        "Bi+MNTP": "Base",
        "Bi+MNTP+Merge": "Bi+MNTP",
        "Bi+Contrastive": "Base",
        "Bi+MNTP+Contrastive": "Bi+MNTP",
    }
    for name, run in v.RUNS.items():
        assert result[name].run == out / "runs" / run
        assert (out / "runs" / run / "metrics.jsonl").is_file() and (out / "runs" / run / "tensorboard").is_dir()
        config = manifest[name]["settings"]["config"]
        parent = result[result[name].parent].path
        assert config["model"]["init_from"] == (str(parent) if parent == base_dir.resolve() else parent.name)
        assert config["model"]["attention"] == "bidirectional"
    assert result["Bi+Contrastive"].contrastive and result["Bi+MNTP+Contrastive"].contrastive
    assert not result["Bi+MNTP"].contrastive


def test_finished_variants_are_reused(built, base_dir):
    out, _, _ = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    phases = []
    again = v.build_variants(base_dir, out, _recipe(), on_phase=lambda n, _, s: phases.append((n, s)))
    assert [s for _, s in phases] == [0.0] * len(v.VARIANTS)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before
    assert again["Bi+MNTP"].path == out / "bi-mntp"


def test_settings_recorded_before_a_key_existed_still_match():
    """A key added to the engine after a variant was recorded compares equal at its default only."""
    recorded = {"from": "base", "config": {"train": {"steps": 2}}, "parent": {"config": {"model": {}}}}
    now = {"from": "base", "config": {"train": {"steps": 2, "max_rows_per_device": 0}}}
    now["parent"] = {"config": {"model": {"scan_layers": False}}}
    assert v.settings_difference(recorded, now) == ""
    now["config"]["train"]["max_rows_per_device"] = 4
    now["parent"]["config"]["model"]["scan_layers"] = True
    assert v.settings_difference(recorded, now) == (
        "config.train.max_rows_per_device: None then, 4 now; parent.config.model.scan_layers: None then, True now"
    )


def test_a_variant_built_with_other_settings_is_refused(built, base_dir):
    out, _, _ = built
    recipe = _recipe()
    recipe.mntp.train.steps = 3
    with pytest.raises(
        ConfigError, match=r"bi-mntp holds a Bi\+MNTP built with other settings .*train.steps: 2 then, 3 now"
    ):
        v.build_variants(base_dir, out, recipe, names=["Bi+MNTP"])
    with pytest.raises(ConfigError, match="base_weight: 0.5 then, 0.3 now"):
        v.build_variants(base_dir, out, _recipe(merge_ratio=0.3), names=["Bi+MNTP+Merge"])


@pytest.mark.slow
def test_contrastive_from_the_merge_in_a_copied_output(built, base_dir, tmp_path):
    """A copy of an output directory is reused as is (paths inside it are recorded relative to it); only
    the one new variant is trained, from the merge."""
    out = tmp_path / "copy"
    shutil.copytree(built[0], out, ignore=shutil.ignore_patterns("bi-mntp-contrastive", "mntp-contrastive"))
    recipe = _recipe(contrastive_from="Bi+MNTP+Merge")
    assert v.requirements("Bi+MNTP+Contrastive", recipe) == ["Bi+MNTP", "Bi+MNTP+Merge"]
    phases = {}
    result = v.build_variants(
        base_dir, out, recipe, names=["Bi+MNTP+Contrastive"], on_phase=lambda n, _, s: phases.update({n: s})
    )
    assert list(result) == ["Bi+MNTP+Contrastive"] and result["Bi+MNTP+Contrastive"].parent == "Bi+MNTP+Merge"
    assert phases["Bi+MNTP"] == phases["Bi+MNTP+Merge"] == 0.0 < phases["Bi+MNTP+Contrastive"]
    manifest = json.loads((out / v.MANIFEST).read_text())
    assert manifest["Bi+MNTP+Contrastive"]["settings"]["config"]["model"]["init_from"] == "bi-mntp-merge"

    # Bi+MNTP rebuilt with other settings: what was made from the old one is stale, and refused as such
    shutil.rmtree(out / "bi-mntp")
    shutil.rmtree(out / "runs" / "mntp")
    recipe.mntp.train.steps = 3
    with pytest.raises(ConfigError, match=r"bi-mntp-merge holds a Bi\+MNTP\+Merge .*parent.config.train.steps: 2 then"):
        v.build_variants(base_dir, out, recipe, names=["Bi+MNTP+Merge"])
    assert (out / "bi-mntp").is_dir()  # the parent itself was rebuilt before the stale child was found


def test_switch_attention_changes_only_the_config(qwen_dir, tmp_path):
    from bidirlm_jax.io.hf_config import read_config

    bi = stages.switch_attention(qwen_dir, tmp_path / "bi", "bidirectional")
    assert json.loads((bi / "config.json").read_text())["is_causal"] is False
    back = stages.switch_attention(bi, tmp_path / "back", "causal")
    assert read_config(back) == read_config(qwen_dir)
    assert (back / "model.safetensors").read_bytes() == (qwen_dir / "model.safetensors").read_bytes()


def test_bad_inputs(tmp_path, gemma_dir):
    with pytest.raises(ConfigError, match="merge_ratio 1.5 must lie in"):
        v.Recipe(merge_ratio=1.5)
    with pytest.raises(ConfigError, match="contrastive_from 'Base' must be one of"):
        v.Recipe(contrastive_from="Base")
    with pytest.raises(ConfigError, match="Recipe.mntp must be an MNTP config"):
        v.Recipe(mntp=v.default_contrastive_config())
    with pytest.raises(ConfigError, match=r"unknown variant\(s\) \['Bi\+MLM'\]"):
        v.build_variants(gemma_dir, tmp_path / "out", names=["Bi+MLM"])
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        v.build_variants(gemma_dir, tmp_path / "out")
    with pytest.raises(ConfigError, match="is not a Hugging Face model directory"):
        v.build_variants(tmp_path, tmp_path / "out")
