"""The `bidirlm` shell: usage errors, bad paths, broken config files and Ctrl-C end in one line and an exit
status, never a traceback. (Bad inputs of convert, merge and train's config keys are tested with them.)"""

import os
import sys
from pathlib import Path

import pytest

from bidirlm_jax import demo
from bidirlm_jax.cli import main
from tests import procs

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "lm.py") + ":tiny"


def _fails_cleanly(capsys, argv, message, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: command"),
        (["nosuch"], "invalid choice: 'nosuch'"),
        (["convert", "a", "b", "--dtype", "int8"], "invalid choice: 'int8'"),
        (["convert", "a"], "the following arguments are required: dst"),
        (["demo", "--outt", "x"], "unrecognized arguments: --outt"),
        (["train"], "usage: bidirlm train --config"),
    ],
)
def test_usage_errors_return_2(capsys, argv, message):
    _fails_cleanly(capsys, argv, message)


def test_help_returns_0(capsys):
    assert main(["--help"]) == 0 and "convert" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0 and "--workdir" in capsys.readouterr().out


@pytest.mark.parametrize(
    "source, message",
    [
        ("def get_config(:\n", "SyntaxError: invalid syntax"),
        ("def get_config():\n    raise RuntimeError('no GPU quota')\n", "RuntimeError: no GPU quota"),
        ("import not_a_module\n", "ModuleNotFoundError: No module named 'not_a_module'"),
        ("X = 1\n", "has no attribute 'get_config'"),
    ],
    ids=["syntax", "raises", "import", "no-get_config"],
)
def test_a_broken_config_file_is_reported_without_writing(tmp_path, capsys, monkeypatch, source, message):
    monkeypatch.delitem(sys.modules, "config_config", raising=False)  # ml_collections re-executes into it
    config = tmp_path / "broken.py"
    config.write_text(source)
    _fails_cleanly(capsys, ["train", "--config", str(config), "--workdir", str(tmp_path / "run")], message)
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_reported(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    args = ["train", "--config", TINY, "--workdir", str(tmp_path / "taken"), "--config.train.steps=1"]
    _fails_cleanly(capsys, [*args, "--config.metrics.progress_bar=False"], str(tmp_path / "taken"))
    assert (tmp_path / "taken").read_text() == "x"


def test_an_output_under_a_file_is_reported(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _fails_cleanly(capsys, ["demo", "--out", str(tmp_path / "file" / "out")], str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "x"


def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def interrupted(tmp, **_):
        (tmp / "variants").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_pipeline", interrupted)
    _fails_cleanly(capsys, ["demo", "--out", str(tmp_path / "out")], "interrupted", code=130)
    assert os.listdir(tmp_path) == []


def test_the_installed_command_prints_one_line(tmp_path):
    """Through the real entry point: exit status 2, one `error:` line, no traceback."""
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    result = procs.run(
        [sys.executable, "-m", "bidirlm_jax.cli", "train", "--config", "broken.py", "--workdir", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
