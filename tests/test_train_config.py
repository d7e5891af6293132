"""`--config FILE.py:PRESET --workdir DIR --config.key=value` parsing, big_vision style."""

from pathlib import Path

import numpy as np
import pytest

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.train.config import model_overrides, parse_train_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "lm.py") + ":tiny"


def test_overrides_apply_with_their_types():
    config, workdir = parse_train_args(
        [
            "--config",
            TINY,
            "--workdir",
            "/tmp/w",
            "--config.train.steps=7",
            "--config.optim.learning_rate=1e-3",
            "--config.model.num_layers=3",
            "--config.metrics.tensorboard=false",
        ]
    )
    assert workdir == "/tmp/w"
    assert config.train.steps == 7 and config.optim.learning_rate == 1e-3 and config.metrics.tensorboard is False
    assert model_overrides(config.model) == {"num_layers": 3}
    assert config.model.preset == "tiny-qwen3" and config.data.source == "synthetic"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", TINY, "--workdir", "w", "--config.optim.lr=1"], "unknown config key 'optim.lr'"),
        (["--config", TINY, "--workdir", "w", "--config.nope.x=1"], "unknown config key 'nope.x'"),
        (["--config", TINY, "--workdir", "w", "--config.train.steps=many"], "config.train.steps"),
        (["--config", TINY, "--workdir", "w", "--config.train.nonfinite=ignore"], "train.nonfinite"),
        (["--config", TINY, "--workdir", "w", "--config.model.remat=some"], "model.remat"),
        (["--config", TINY, "--workdir", "w", "--config.train.steps=0"], "train.steps=0 must be positive"),
        (
            ["--config", TINY, "--workdir", "w", "--config.train.max_consecutive_skips=0"],
            "train.max_consecutive_skips=0 must be positive",
        ),
        (["--config", TINY], "missing --workdir"),
        (["--workdir", "w"], "missing --config"),
        (["--config", "configs/missing.py", "--workdir", "w"], "cannot load --config"),
        (["--config", TINY.replace(":tiny", ":huge"), "--workdir", "w"], "unknown preset 'huge'"),
        (["--config", TINY, "--workdir", "w", "extra"], "unexpected arguments ['extra']"),
    ],
)
def test_bad_arguments_raise_a_named_config_error(argv, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_train_args(argv)


@pytest.mark.parametrize(
    "spec, reader",
    [("lm:tiny", "data.source=text"), ("mntp:tiny", "data.source=text"), ("contrastive:tiny", "data.source=pairs")],
)
def test_a_data_path_the_source_would_not_read_is_refused(spec, reader, tmp_path, capsys):
    """The tiny presets generate their data (synthetic / stdlib): a user's data.path was silently ignored."""
    from bidirlm_jax.cli import main

    run = tmp_path / "run"
    assert main(["train", f"--config={spec}", f"--workdir={run}", f"--config.data.path={tmp_path / 'mine.txt'}"]) == 2
    err = capsys.readouterr().err
    assert "would be ignored" in err and reader in err and "mine.txt" in err
    assert not run.exists()


def test_own_text_with_a_tiny_model_trains_its_tokenizer_on_that_text(tmp_path):
    """mntp:tiny on a user's file, no tokenizer given: a BPE trained on that text (its made-up word is one token)."""
    from bidirlm_jax.io.tokenizer import load_tokenizer
    from bidirlm_jax.train import train

    text = tmp_path / "mine.txt"
    text.write_text("".join(f"the zorblaxian quuxwing number {i} flies over zorblaxian hills\n" for i in range(300)))
    config, workdir = parse_train_args(
        [f"--config={CONFIGS / 'mntp.py'}:tiny", f"--workdir={tmp_path / 'run'}", "--config.data.source=text"]
        + [f"--config.data.path={text}", "--config.train.steps=2", "--config.optim.warmup_steps=1"]
        + ["--config.data.seq_len=32", "--config.data.global_batch_size=8", "--config.metrics.progress_bar=false"]
    )
    result = train(config, workdir)
    assert result["step"] == 2 and np.isfinite(result["loss"])
    tokenizer = load_tokenizer(tmp_path / "run" / "model")
    assert len(tokenizer.tokenize(" zorblaxian")) == 1  # learned from the user's text, not the standard library's
