"""Every `bidirlm` verb that reads a model accepts a released BidirLM directory (a tiny Qwen3-based encoder in the
released layout, with its sentence-transformers files: mean pooling, a default `query` prompt); `embed` honours
those files; bad combinations exit 2 and write nothing."""

import json
import shutil

import numpy as np
import pytest

from bidirlm_jax.embed.encode import encode, query_prompt
from bidirlm_jax.io.hf import from_pretrained
from bidirlm_jax.io.hf_config import read_config_dict
from bidirlm_jax.io.sentence_transformers import read_encoder_settings
from bidirlm_jax.io.tokenizer import load_tokenizer
from tests.encoders import MAX_LENGTH, TEXTS, make_beir, make_encoder_src, run_cli
from tests.released_files import write_released

MNTP_TINY = "configs/mntp.py:tiny"
QUIET = ["--config.metrics.progress_bar=False", "--config.metrics.tensorboard=False"]


def add_st_files(out, *, include_prompt=True):
    """The released embedders' sentence-transformers files: Transformer → mean Pooling → Normalize, prompts."""
    modules = [
        {"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{t}"}
        for i, (p, t) in enumerate((("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")))
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"embedding_dimension": 64, "pooling_mode": "mean", "include_prompt": include_prompt}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_LENGTH}))
    st = {"prompts": {"query": query_prompt("find it"), "document": "passage: "}, "default_prompt_name": "query"}
    (out / "config_sentence_transformers.json").write_text(json.dumps(st))
    return out


@pytest.fixture(scope="module")
def released_encoder(qwen_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("released-cli")
    native = make_encoder_src(qwen_dir, root / "native")
    return add_st_files(write_released(native, root / "released", "masked_lm"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("released-inputs")
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    make_beir(root / "beir")
    return root


VERBS = {
    "convert": lambda m, i, o: ["convert", m, o / "out"],
    "convert-to-bidirlm": lambda m, i, o: ["convert", m, o / "out", "--to", "hf", "--format", "bidirlm"],
    "merge": lambda m, i, o: ["merge", "--model", f"{m}=1", "--model", f"{m}=3", "--out", o / "out", "--no-progress"],
    "export": lambda m, i, o: ["export", m, o / "out"],
    "export-bidirlm": lambda m, i, o: ["export", m, o / "out", "--format", "bidirlm"],
    "embed": lambda m, i, o: ["embed", "--model", m, "--input", i / "texts.txt", "--output", o / "out.npy"],
    "eval": lambda m, i, o: ["eval", "--model", m, "--beir", i / "beir", "--no-progress", "--output", o / "out.json"],
    "train": lambda m, i, o: (
        ["train", "--config", MNTP_TINY, "--workdir", o / "out", *QUIET, "--config.train.steps=1"]
        + [f"--config.model.init_from={m}"]
    ),
}


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_accepts_a_released_directory(released_encoder, inputs, tmp_path, verb):
    assert run_cli(VERBS[verb](released_encoder, inputs, tmp_path)) == 0
    out = next(tmp_path.glob("out*"))
    if verb in ("convert", "merge", "export", "export-bidirlm", "convert-to-bidirlm", "train"):
        from_pretrained(out)  # what each wrote loads back
    if verb in ("merge", "export-bidirlm", "convert-to-bidirlm"):
        assert read_config_dict(out)["model_type"] == "bidirlm"  # merge keeps the base's format
    if verb == "export":
        assert read_config_dict(out)["model_type"] == "qwen3" and (out / "modules.json").is_file()


def test_embed_honours_the_sentence_transformers_files(released_encoder, inputs, tmp_path, capsys):
    """Mean pooling, normalised, the default `query` prompt prepended (as SentenceTransformer.encode does),
    `--prompt-name document` for the other prompt."""
    settings = read_encoder_settings(released_encoder)
    assert (settings.pooling, settings.normalize, settings.default_prompt_name) == ("mean", True, "query")
    model, tokenizer = from_pretrained(released_encoder), load_tokenizer(released_encoder)
    kw = dict(max_length=MAX_LENGTH, batch_size=4)
    for extra, expected in (
        ([], encode(model, tokenizer, TEXTS, instruction="find it", **kw)),
        (["--prompt-name", "document"], encode(model, tokenizer, ["passage: " + t for t in TEXTS], **kw)),
    ):
        out = tmp_path / f"out{len(extra)}.npy"
        argv = ["embed", "--model", released_encoder, "--input", inputs / "texts.txt", "--output", out, *extra]
        assert run_cli([*argv, "--batch-size", 4]) == 0
        np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    assert "custom code" not in "".join(capsys.readouterr())  # the tokenizer loads without the remote code


def test_bad_combinations_exit_2_and_write_nothing(released_encoder, inputs, tmp_path, capsys):
    texts, out = inputs / "texts.txt", tmp_path / "out"
    for argv, message in (
        (["convert", released_encoder, out, "--format", "bidirlm"], "add --to hf"),
        (["export", released_encoder, out, "--format", "bidirlm", "--attention", "causal"], "is bidirectional"),
        (["merge", "--model", f"{released_encoder}=1", "--out", out, "--attention", "causal"], "runs bidirectionally"),
        (["embed", "--model", released_encoder, "--input", texts, "--output", out, "--prompt-name", "x"], "no prompt"),
        (
            ["embed", "--model", released_encoder, "--input", texts, "--output", out]
            + ["--prompt-name", "query", "--instruction", "y"],
            "not both",
        ),
    ):
        assert run_cli(argv) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    dense = shutil.copytree(released_encoder, tmp_path / "dense")
    add_st_files(dense, include_prompt=False)
    assert run_cli(["embed", "--model", dense, "--input", texts, "--output", out]) == 2
    assert "include_prompt: false" in capsys.readouterr().err
    modules = json.loads((dense / "modules.json").read_text())
    (dense / "modules.json").write_text(json.dumps([*modules, {"idx": 3, "path": "3_Dense", "type": "Dense"}]))
    assert run_cli(["embed", "--model", dense, "--input", texts, "--output", out]) == 2
    assert "modules ['Dense'] change the embedding" in capsys.readouterr().err
    assert not out.exists()
