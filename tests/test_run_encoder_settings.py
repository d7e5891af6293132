"""A contrastive run's recorded pooling and length reach `bidirlm export RUN` and `bidirlm embed --model RUN`
(they used mean pooling and 512 tokens whatever the run trained with); a flag that disagrees is warned of."""

import json

import numpy as np
import pytest

from bidirlm_jax.cli import main
from bidirlm_jax.configs import contrastive
from bidirlm_jax.embed.encode import encode
from bidirlm_jax.io.hf import from_pretrained
from bidirlm_jax.io.sentence_transformers import load_encoder, read_encoder_settings
from bidirlm_jax.train import train

SEQ_LEN = 32
TEXTS = ["the quick brown fox jumps", "a function returns a value", "x"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps of the tiny contrastive preset trained with last-token pooling."""
    config = contrastive.get_config("tiny")
    config.contrastive.pooling = "last"
    config.data.update(seq_len=SEQ_LEN, global_batch_size=8)
    config.train.update(steps=2, checkpoint_every=2)
    config.optim.warmup_steps = 1
    config.metrics.update(progress_bar=False, tensorboard=False)
    workdir = tmp_path_factory.mktemp("con") / "run"
    train(config, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def _embeddings(model_dir, pooling):
    model, tokenizer, _ = load_encoder(model_dir)
    return encode(model, tokenizer, TEXTS, pooling=pooling, max_length=SEQ_LEN)


def test_a_run_reads_back_as_its_training_settings(run):
    settings = read_encoder_settings(run)
    assert (settings.pooling, settings.max_length) == ("last", SEQ_LEN)


def test_export_of_a_run_writes_its_pooling_and_length(run, tmp_path, capsys):
    assert main(["export", str(run), str(tmp_path / "enc")]) == 0
    assert "warning" not in capsys.readouterr().err
    pooling = json.loads((tmp_path / "enc" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] and not pooling["pooling_mode_mean_tokens"]
    assert json.loads((tmp_path / "enc" / "sentence_bert_config.json").read_text())["max_seq_length"] == SEQ_LEN
    assert json.loads((tmp_path / "enc" / "tokenizer_config.json").read_text())["local_files_only"] is True
    exported = read_encoder_settings(tmp_path / "enc")
    assert (exported.pooling, exported.max_length) == ("last", SEQ_LEN)


def test_embed_of_a_run_uses_its_pooling(run, texts_file, tmp_path, capsys):
    assert main(["embed", "--model", str(run), "--input", str(texts_file), "--output", str(tmp_path / "e.npy")]) == 0
    assert "warning" not in capsys.readouterr().err
    got = np.load(tmp_path / "e.npy")
    last, mean = _embeddings(run, "last"), _embeddings(run, "mean")
    np.testing.assert_array_equal(got, last)  # the same computation: exact
    assert not np.allclose(got, mean, atol=1e-3)  # and not the old default's


def test_a_flag_that_disagrees_with_the_run_is_warned_of(run, texts_file, tmp_path, capsys):
    argv = ["embed", "--model", str(run), "--input", str(texts_file), "--output", str(tmp_path / "e.npy")]
    assert main([*argv, "--pooling", "mean"]) == 0
    err = capsys.readouterr().err
    assert "--pooling mean" in err and "pooling=last" in err and str(run) in err
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), _embeddings(run, "mean"))
    assert main(["export", str(run), str(tmp_path / "enc"), "--max-length", "16"]) == 0
    err = capsys.readouterr().err
    assert "--max-length 16" in err and f"max_length={SEQ_LEN}" in err


def test_a_run_of_another_objective_keeps_the_defaults(tmp_path):
    from bidirlm_jax.configs import lm

    config = lm.get_config("tiny")
    config.train.update(steps=1, checkpoint_every=1)
    config.optim.warmup_steps = 1
    config.metrics.update(progress_bar=False, tensorboard=False)
    train(config, str(tmp_path / "lm"))
    settings = read_encoder_settings(tmp_path / "lm")
    assert (settings.pooling, settings.max_length, settings.origin) == ("mean", 512, "")
    assert from_pretrained(tmp_path / "lm").config.num_layers > 0


def test_export_of_a_run_names_the_prompts_it_trained_with(run, tmp_path, capsys):
    """The run's datasets' query instructions become the export's sentence-transformers prompts (by dataset,
    and `query` when the asymmetric datasets share one); `--instruction` replaces `query`, with a warning."""
    from bidirlm_jax.data.stdlib_text import stdlib_pairs

    _, instructions = stdlib_pairs(num_negatives=contrastive.get_config("tiny").contrastive.num_negatives)
    expected = {name: f"Instruct: {i.text}\nQuery: " for name, i in instructions.items()}
    asymmetric = {f"Instruct: {i.text}\nQuery: " for i in instructions.values() if not i.symmetric}
    if len(asymmetric) == 1:
        expected["query"] = asymmetric.pop()
    assert expected and read_encoder_settings(run).prompts == expected

    assert main(["export", str(run), str(tmp_path / "enc")]) == 0
    written = json.loads((tmp_path / "enc" / "config_sentence_transformers.json").read_text())["prompts"]
    assert written == expected and "warning" not in capsys.readouterr().err

    assert main(["export", str(run), str(tmp_path / "told"), "--instruction", "Find the docstring"]) == 0
    written = json.loads((tmp_path / "told" / "config_sentence_transformers.json").read_text())["prompts"]
    assert written == {**expected, "query": "Instruct: Find the docstring\nQuery: "}
    err = capsys.readouterr().err
    assert ("replaces the query prompt" in err) == ("query" in expected)
