"""`bidirlm demo`: where it may write (never over what it did not write), atomically, from an installed package;
and one real run at a reduced size (`slow`). Its parts (corpus, base, table, plot) are tests/test_pipeline.py's.

The pipeline is replaced by a fake that writes a directory except in the slow end-to-end run.
"""

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bidirlm_jax
from bidirlm_jax import demo
from bidirlm_jax.cli import main
from bidirlm_jax.configs.sizes import QUICK
from bidirlm_jax.errors import ConfigError, Preempted
from bidirlm_jax.pipeline.report import METRICS
from bidirlm_jax.pipeline.variants import VARIANTS
from tests import procs

PACKAGE = Path(bidirlm_jax.__file__).parent


@pytest.fixture
def fake_pipeline(monkeypatch):
    """The demo's pipeline as a fake: it writes `base/` and `encoder/` and checks nothing."""

    def pipeline(tmp, *, model, size, progress, omni):
        for name in ("base", "encoder"):
            (tmp / name).mkdir()
            (tmp / name / "config.json").write_text("{}")
        return {"table": "the table", "parity": {"base, causal attention": 0.0}}

    monkeypatch.setattr(demo, "_pipeline", pipeline)


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() if p.is_file() else "/" for p in sorted(path.rglob("*"))}


def test_writes_its_outputs_and_a_marker(fake_pipeline, tmp_path, capsys):
    out = tmp_path / "new" / "demo_out"
    assert main(["demo", "--out", str(out)]) == 0
    assert json.loads((out / demo.MARKER).read_text()) == {"entries": ["base", "encoder"]}
    assert sorted(os.listdir(out.parent)) == ["demo_out"]  # no temporary directory left beside it
    assert "the table" in capsys.readouterr().out


@pytest.mark.parametrize("quick", [False, True])
def test_a_quick_run_says_its_numbers_are_not_meaningful(fake_pipeline, tmp_path, capsys, quick):
    assert main(["demo", "--out", str(tmp_path / "out"), *(["--quick"] if quick else [])]) == 0
    assert ("smoke run" in capsys.readouterr().out) == quick


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_the_current_directory_is_never_replaced(fake_pipeline, tmp_path, monkeypatch, capsys, overwrite):
    """The reported bug: `--out .` deleted the working directory."""
    (tmp_path / "work.txt").write_text("precious")
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    assert main(["demo", "--out", ".", *overwrite]) == 2
    assert "current directory" in capsys.readouterr().err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_directory_the_demo_did_not_write_is_refused_untouched(fake_pipeline, tmp_path, capsys, overwrite):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "thesis.tex").write_text("precious")
    assert main(["demo", "--out", str(out), *overwrite]) == 2
    assert "is not a `bidirlm demo` output" in capsys.readouterr().err
    assert _tree(out) == {"sub": "/", "sub/thesis.tex": "precious"}


def test_a_previous_output_is_replaced_only_with_overwrite(fake_pipeline, tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert main(["demo", "--out", str(out)]) == 0
    (out / "base" / "stale.txt").write_text("from the last run")  # inside a directory the demo wrote: replaced
    assert main(["demo", "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (out / "base" / "stale.txt").exists()
    assert main(["demo", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "base" / "stale.txt").exists() and (out / demo.MARKER).is_file()


def test_files_added_beside_a_previous_output_block_the_overwrite(fake_pipeline, tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert main(["demo", "--out", str(out)]) == 0
    (out / "notes.md").write_text("mine")
    before = _tree(out)
    assert main(["demo", "--out", str(out), "--overwrite"]) == 2
    assert "did not write (notes.md)" in capsys.readouterr().err
    assert _tree(out) == before


def test_an_empty_directory_is_used_and_a_file_refused(fake_pipeline, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["demo", "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / demo.MARKER).is_file()
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file"), "--overwrite"]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"


def test_a_failure_leaves_nothing_behind(fake_pipeline, tmp_path, monkeypatch, capsys):
    def broken(tmp, **kwargs):
        (tmp / "base").mkdir()
        raise ConfigError("simulated failure")

    monkeypatch.setattr(demo, "_pipeline", broken)
    assert main(["demo", "--out", str(tmp_path / "demo_out")]) == 2
    assert "simulated failure" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_preempted_demo_says_its_run_is_gone(fake_pipeline, tmp_path, monkeypatch, capsys):
    def preempted(tmp, **kwargs):
        raise Preempted(tmp / "runs" / "lm", 2)

    monkeypatch.setattr(demo, "_pipeline", preempted)
    assert main(["demo", "--out", str(tmp_path / "demo_out")]) == 0  # as `bidirlm train` on SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 2; nothing was recorded" in err and "start over" in err
    assert os.listdir(tmp_path) == []


def test_a_model_that_is_not_a_checkpoint_is_refused_before_any_work(fake_pipeline, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="config.json and tokenizer.json"):
        demo.run_demo(tmp_path / "demo_out", model=tmp_path / "model")
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_the_configs_are_read_from_the_installed_package(tmp_path):
    """A copy of the package alone (no repository around it) builds every training config of the demo."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "bidirlm_jax", ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        from bidirlm_jax.configs import sizes
        from bidirlm_jax.pipeline.variants import Recipe
        lm = sizes.lm_config(sizes.FULL, Path("init"), Path("tokens.npy"), False)
        mntp, con = sizes.stage_configs(sizes.FULL, Path("data"), Path("tok"))
        Recipe(mntp=mntp, contrastive=con)
        files = [m.__file__ for m in list(sys.modules.values())
                 if m.__name__.split(".")[0] in ("bidirlm_jax", "configs") and getattr(m, "__file__", None)]
        print(json.dumps({"objectives": [lm.objective, mntp.objective, con.objective],
                          "outside": [f for f in files if not f.startswith(sys.argv[1])]}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    result = procs.run(
        [sys.executable, "-c", script, str(site)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "objectives": ["causal_lm", "mntp", "contrastive"],
        "outside": [],
    }


def test_train_takes_the_package_config_path_and_the_repository_shim():
    from bidirlm_jax.train.config import parse_train_args

    shim = PACKAGE.parent / "configs" / "lm.py"
    for path in (PACKAGE / "configs" / "lm.py", shim):
        config, _ = parse_train_args(["--config", f"{path}:tiny", "--workdir", "w"])
        assert config.model.preset == "tiny-qwen3"


# --- the whole demo, at a reduced size ------------------------------------------------------------------


def test_omni_with_a_model_is_refused_before_any_work(fake_pipeline, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="drop --model"):
        demo.run_demo(tmp_path / "demo_out", model=model, omni=True)
    assert not (tmp_path / "demo_out").exists()


@pytest.mark.slow
def test_the_whole_demo_runs(tmp_path, capsys):
    """The text variants on a Qwen3-shaped base, then the Omni stage (the Gemma3 base is the ablation tests')."""
    out = tmp_path / "demo_out"
    assert demo.run_demo(out, quick=True, omni=True) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    for name in VARIANTS:
        assert any(line.startswith(f"{name} ") for line in lines), name
    assert printed.count(" ok") == 2 and "MISMATCH" not in printed
    record = json.loads((out / "results.json").read_text())
    assert list(record["results"]) == list(VARIANTS)
    for row in record["results"].values():
        assert all(0.0 <= row[key] <= 1.0 for key, _ in METRICS)
    assert (out / "variants.png").read_bytes()[:4] == b"\x89PNG"
    entries = set(json.loads((out / demo.MARKER).read_text())["entries"])
    assert {
        "base",
        "encoder",
        "variants",
        "runs",
        "data",
        "results.json",
        "variants.png",
        "omni",
        "omni.png",
        "encoder-omni",
    } <= entries
    assert (out / "encoder-omni" / "modules.json").is_file()
    _check_omni(out, record["omni"], printed)

    from sentence_transformers import SentenceTransformer

    from bidirlm_jax.io.hf_config import read_runtime

    assert read_runtime(out / "base").attention == "causal" and (out / "base" / "tokenizer.json").is_file()
    encoder = SentenceTransformer(str(out / "encoder"), device="cpu")
    embeddings = encoder.encode(["Heap queue algorithm.", "Parse JSON text."])
    assert embeddings.shape == (2, QUICK.hidden_size)
    assert list((out / "variants" / "runs").iterdir()) and (out / "runs" / "lm" / "tensorboard").is_dir()


def _check_omni(out: Path, record: dict, printed: str) -> None:
    """Every model of the Omni table on the tasks it reads; each specialist's text stack started as the base's;
    the Omni runs left the towers they were composed with bit-identical."""
    from bidirlm_jax.pipeline.omni import COMPOSED, COMPOSED_UNTRAINED, NOT_COMPOSED

    tasks = {name: set(row["tasks"]) for name, row in record["results"].items()}
    assert tasks == {
        "Bi+MNTP+Contrastive": {"text"},
        "vision specialist": {"text", "image"},
        "audio specialist": {"text", "audio"},
        COMPOSED_UNTRAINED: {"text", "image", "audio"},
        NOT_COMPOSED: {"text", "image", "audio"},
        COMPOSED: {"text", "image", "audio"},
    }
    for row in record["results"].values():
        for metrics in row["tasks"].values():
            assert 0.0 <= metrics["ndcg_at_10"] <= 1.0 and metrics["num_queries"] > 0
    assert record["table"] in printed and (out / "omni.png").read_bytes()[:4] == b"\x89PNG"
    base = _tensors(out / "base")
    prefix = "model.language_model."
    for modality in ("image", "audio"):
        init = _tensors(out / "omni" / "init" / modality)
        text = {k[len(prefix) :]: v for k, v in init.items() if k.startswith(prefix)}
        assert text and all(np.array_equal(v, base[f"model.{k}"]) for k, v in text.items()), modality
    for slug in ("composed", "not-composed"):
        before, after = _tensors(out / "omni" / "init" / slug), _tensors(out / "omni" / slug)
        towers = [k for k in before if k.startswith(("visual.", "audio_tower."))]
        assert towers and all(np.array_equal(before[k], after[k]) for k in towers), slug


def _tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
