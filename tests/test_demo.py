"""`bidirlm demo`: where it may write (never over what it did not write), atomically, from an installed package.

The heavy stages are replaced by fakes that write a file each, except in the one slow end-to-end run.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bidirlm_jax
from bidirlm_jax import demo
from bidirlm_jax.cli import main
from bidirlm_jax.errors import ConfigError

PACKAGE = Path(bidirlm_jax.__file__).parent


@pytest.fixture
def fake_stages(monkeypatch):
    """The demo's stages as fakes: the base 'learns', each family writes one directory and passes."""

    def train_base(out):
        (out / "lm").mkdir()
        (out / "lm" / "metrics.jsonl").write_text('{"loss": 1.0}\n')
        return True

    def family(name, out):
        (out / f"{name}-hf").mkdir()
        return [(name, 0.0)]

    monkeypatch.setattr(demo, "_train_base", train_base)
    monkeypatch.setattr(demo, "_family", family)


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() if p.is_file() else "/" for p in sorted(path.rglob("*"))}


def test_writes_its_outputs_and_a_marker(fake_stages, tmp_path):
    out = tmp_path / "new" / "demo_out"
    assert main(["demo", "--out", str(out)]) == 0
    assert json.loads((out / demo.MARKER).read_text()) == {"entries": ["gemma3-hf", "lm", "qwen3-hf"]}
    assert sorted(os.listdir(out.parent)) == ["demo_out"]  # no temporary directory left beside it


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_the_current_directory_is_never_replaced(fake_stages, tmp_path, monkeypatch, capsys, overwrite):
    """The reported bug: `--out .` deleted the working directory."""
    (tmp_path / "work.txt").write_text("precious")
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    assert main(["demo", "--out", ".", *overwrite]) == 2
    assert "current directory" in capsys.readouterr().err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_directory_the_demo_did_not_write_is_refused_untouched(fake_stages, tmp_path, capsys, overwrite):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "thesis.tex").write_text("precious")
    assert main(["demo", "--out", str(out), *overwrite]) == 2
    assert "is not a `bidirlm demo` output" in capsys.readouterr().err
    assert _tree(out) == {"sub": "/", "sub/thesis.tex": "precious"}


def test_a_previous_output_is_replaced_only_with_overwrite(fake_stages, tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert main(["demo", "--out", str(out)]) == 0
    (out / "lm" / "stale.txt").write_text("from the last run")  # inside a directory the demo wrote: replaced
    assert main(["demo", "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (out / "lm" / "stale.txt").exists()
    assert main(["demo", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "lm" / "stale.txt").exists() and (out / demo.MARKER).is_file()


def test_files_added_beside_a_previous_output_block_the_overwrite(fake_stages, tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert main(["demo", "--out", str(out)]) == 0
    (out / "notes.md").write_text("mine")
    before = _tree(out)
    assert main(["demo", "--out", str(out), "--overwrite"]) == 2
    assert "did not write (notes.md)" in capsys.readouterr().err
    assert _tree(out) == before


def test_an_empty_directory_is_used_and_a_file_refused(fake_stages, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["demo", "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / demo.MARKER).is_file()
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file"), "--overwrite"]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"


def test_a_failure_leaves_nothing_behind(fake_stages, tmp_path, monkeypatch, capsys):
    def broken(name, out):
        (out / f"{name}-hf").mkdir()
        raise ConfigError("simulated failure")

    monkeypatch.setattr(demo, "_family", broken)
    assert main(["demo", "--out", str(tmp_path / "demo_out")]) == 2
    assert "simulated failure" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_the_config_is_read_from_the_installed_package(tmp_path):
    """A copy of the package alone (no repository around it) finds the demo's training config."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "bidirlm_jax", ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        import bidirlm_jax, bidirlm_jax.train
        from bidirlm_jax import demo
        seen = {}
        def train(config, workdir):
            seen["preset"] = config.model.preset
            Path(workdir).mkdir()
            Path(workdir, "metrics.jsonl").write_text('{"loss": 3.0}\\n{"loss": 1.0}\\n')
        bidirlm_jax.train.train = train
        out = Path(sys.argv[1])
        out.mkdir()
        assert demo._train_base(out)
        files = [m.__file__ for m in list(sys.modules.values()) if m.__name__.split(".")[0] in ("bidirlm_jax", "configs")]
        print(json.dumps({"preset": seen["preset"], "outside": [f for f in files if not f.startswith(sys.argv[2])]}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out"), str(site)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"preset": "tiny-qwen3", "outside": []}


def test_train_takes_the_package_config_path_and_the_repository_shim():
    from bidirlm_jax.train.config import parse_train_args

    shim = PACKAGE.parent / "configs" / "lm.py"
    for path in (PACKAGE / "configs" / "lm.py", shim):
        config, _ = parse_train_args(["--config", f"{path}:tiny", "--workdir", "w"])
        assert config.model.preset == "tiny-qwen3"


@pytest.mark.slow
def test_the_whole_demo_passes(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo_out")]) == 0
    printed = capsys.readouterr().out
    assert "MISMATCH" not in printed and printed.count(" ok") == 6
    entries = json.loads((tmp_path / "demo_out" / demo.MARKER).read_text())["entries"]
    assert {"lm", "gemma3-encoder-hf", "qwen3-encoder-hf"} <= set(entries)
