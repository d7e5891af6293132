"""`--config FILE.py:PRESET --workdir DIR --config.key=value` parsing, big_vision style."""

from pathlib import Path

import pytest

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.train.config import model_overrides, parse_train_args

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "lm.py") + ":tiny"


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
