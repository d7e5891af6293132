"""The MNTP and contrastive objectives through the engine: real text and pairs in, learning, exact resume,
exact mixtures, single-dataset batches, exports that carry the tokenizer, and inputs refused up front."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ml_collections import ConfigDict

import bidirlm_jax
from bidirlm_jax.cli import main
from bidirlm_jax.configs import contrastive as contrastive_configs
from bidirlm_jax.configs import mntp as mntp_configs
from bidirlm_jax.data.stdlib_text import stdlib_docstrings
from bidirlm_jax.io.tokenizer import train_tokenizer
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.train import build_objective, train
from tests.runs import metrics_of

DOCS = [doc for _, doc in stdlib_docstrings()][:120]


def _quiet(config: ConfigDict) -> ConfigDict:
    config.metrics.update(progress_bar=False, tensorboard=False)
    return config


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(DOCS, 512, path)
    return path


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """The same documents as .txt (one per line), .jsonl and .parquet."""
    root = tmp_path_factory.mktemp("text")
    lines = [d.replace("\n", " ") for d in DOCS]
    (root / "docs.txt").write_text("\n".join(lines) + "\n")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    pq.write_table(pa.table({"text": lines}), root / "docs.parquet")
    return root


def _mntp_config(**data) -> ConfigDict:
    config = _quiet(mntp_configs.get_config("tiny"))
    config.data.update(**data)
    return config


@pytest.mark.parametrize("suffix", ["txt", "jsonl", "parquet"])
def test_every_text_format_gives_the_same_batches(suffix, text_files, tokenizer_dir, tmp_path):
    """A real tokenizer (with a mask token) on .txt/.jsonl/.parquet: the same packed rows, masks eligible
    only on real, non-special tokens that have a predecessor in their document."""
    model = get_preset("tiny-gemma3")
    config = _mntp_config(source="text", path=str(text_files / f"docs.{suffix}"), tokenizer=str(tokenizer_dir))
    rows = build_objective(config, model, workdir=tmp_path).rows
    reference = _mntp_config(source="text", path=str(text_files / "docs.txt"), tokenizer=str(tokenizer_dir))
    expected = build_objective(reference, model, workdir=tmp_path / "ref").rows
    for i in (0, 1, 7):
        for key, value in expected[i].items():
            np.testing.assert_array_equal(rows[i][key], value, err_msg=key)
    row = rows[0]
    starts = np.flatnonzero(np.diff(row["segment_ids"], prepend=-1) != 0)
    assert not row["maskable"][starts].any() and not row["maskable"][row["attention_mask"] == 0].any()
    assert not np.isin(row["input_ids"][row["maskable"]], [0, 1, 2, 3, 4]).any()  # no special token is maskable


def test_a_mixture_is_exact_and_reports_a_loss_per_source(text_files, tokenizer_dir, tmp_path):
    model = get_preset("tiny-gemma3")
    mixture = f"prose:0.75:{text_files / 'docs.txt'};code:0.25:{text_files / 'docs.jsonl'}"
    config = _mntp_config(source="text", mixture=mixture, tokenizer=str(tokenizer_dir))
    objective = build_objective(config, model, workdir=tmp_path)
    sources = np.array([objective.rows[i]["source"] for i in range(400)])
    assert np.bincount(sources).tolist() == [300, 100]
    # The engine's means divide every sum by the 10 targets: prose scored 6 at mean 3.0, code 4 at mean 7.0.
    means = {"loss": 4.6, "tokens": 10.0, "masked_accuracy": 0.1, "mntp_overflow": 0.0}
    means |= {"loss/source_0": 1.8, "tokens/source_0": 0.6, "loss/source_1": 2.8, "tokens/source_1": 0.4}
    logged = objective.report(means)
    assert logged["loss/prose"] == pytest.approx(3.0) and logged["loss/code"] == pytest.approx(7.0)
    assert logged["tokens/prose"] == 6 and logged["tokens/code"] == 4 and logged["masked_tokens"] == 10


def test_a_resumed_run_uses_its_saved_tokenizer(text_files, tokenizer_dir, tmp_path):
    """The engine saves the run's tokenizer in `WORKDIR/model/`; a resumed run reads it from there, whatever
    has become of `data.tokenizer` since (here: gone)."""
    import shutil

    own = shutil.copytree(tokenizer_dir, tmp_path / "tokenizer")
    config = _mntp_config(source="text", path=str(text_files / "docs.txt"), tokenizer=str(own), seq_len=32)
    config.data.global_batch_size = 8
    config.train.update(steps=1, checkpoint_every=1, log_every=1)
    workdir = tmp_path / "run"
    train(config, str(workdir))
    assert (workdir / "model" / "tokenizer.json").is_file()
    shutil.rmtree(own)
    config.train.steps = 2
    train(config, str(workdir))
    assert [row["step"] for row in metrics_of(workdir)] == [1, 2]


def test_a_reserved_mask_row_is_never_a_target_as_in_the_saved_tokenizer(tmp_path):
    """Qwen3 masks with a reserved, non-special row. The run records it as the mask token before packing, so
    text holding that token packs as a resumed run (which loads the saved tokenizer, mask token special) packs it."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    backend = train_tokenizer(DOCS, 511).backend_tokenizer
    backend.add_tokens([AddedToken("<|reserved|>", special=False, normalized=False)])
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>").save_pretrained(
        tmp_path / "tok"
    )
    (tmp_path / "docs.txt").write_text("".join(f"<|reserved|> {d.replace(chr(10), ' ')}\n" for d in DOCS[:40]))
    config = _mntp_config(source="text", path=str(tmp_path / "docs.txt"), tokenizer=str(tmp_path / "tok"))
    config.mntp.mask_token = "<|reserved|>"
    objective = build_objective(config, get_preset("tiny-gemma3"), workdir=tmp_path / "run")
    reserved = objective.tokenizer.mask_token_id
    assert reserved == 511 and reserved in objective.tokenizer.all_special_ids
    rows = [objective.rows[i] for i in range(8)]
    assert sum((row["input_ids"] == reserved).sum() for row in rows) > 0
    assert not any(row["maskable"][row["input_ids"] == reserved].any() for row in rows)


@pytest.mark.slow
def test_mntp_learns_and_its_run_exports_an_encoder_with_its_mask_token(tmp_path):
    workdir = tmp_path / "run"
    config = _quiet(mntp_configs.get_config("tiny"))
    config.train.log_every = 5
    train(config, str(workdir))  # the preset: 150 steps on the standard library's docstrings
    rows = metrics_of(workdir)
    early, late = rows[:1], rows[-3:]
    assert np.mean([r["loss"] for r in late]) < np.mean([r["loss"] for r in early]) - 0.6
    accuracy = [np.mean([r["masked_accuracy"] for r in part]) for part in (early, late)]
    assert accuracy[1] > accuracy[0] + 0.015, accuracy
    assert all(r["masked_tokens"] > 0 for r in rows)
    assert main(["export", str(workdir), str(tmp_path / "encoder")]) == 0
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(tmp_path / "encoder"), device="cpu")
    assert encoder.tokenizer.mask_token == "<mask>"
    model = bidirlm_jax.from_pretrained(workdir)
    assert model.runtime.attention == "bidirectional"


def test_contrastive_batches_each_come_from_one_dataset(tmp_path):
    config = _quiet(contrastive_configs.get_config("tiny"))
    objective = build_objective(config, get_preset("tiny-gemma3"), workdir=tmp_path)
    b = config.data.global_batch_size
    seen = set()
    for batch in range(12):
        ids = {int(objective.rows[batch * b + r]["dataset"]) for r in range(b)}
        assert len(ids) == 1
        seen |= ids
    assert seen == {0, 1}  # both mined datasets appear


@pytest.mark.slow
def test_contrastive_learns(tmp_path):
    config = _quiet(contrastive_configs.get_config("tiny"))
    train(config, str(tmp_path / "run"))
    rows = metrics_of(tmp_path / "run")
    early, late = rows[:3], rows[-3:]
    assert np.mean([r["loss"] for r in late]) < np.mean([r["loss"] for r in early]) - 0.5
    assert np.mean([r["in_batch_accuracy"] for r in late]) > np.mean([r["in_batch_accuracy"] for r in early]) + 0.1
    assert all(r["samples_per_second"] > 0 for r in rows)


@pytest.mark.parametrize(
    "config_file, overrides, message",
    [
        ("configs/mntp.py:tiny", ["--config.mntp.mask_ratio=1.5"], "ratio"),
        # a real text source with no checkpoint and no tokenizer (a tiny MNTP model would train its own BPE)
        ("configs/contrastive.py:tiny", ["--config.data.source=pairs", "--config.data.path=p.jsonl"], "tokenizer"),
        ("configs/mntp.py:tiny", ["--config.data.source=text"], "data.path"),
        ("configs/mntp.py:tiny", ["--config.mntp.mask_token=<nope>"], "mask_token"),
        ("configs/contrastive.py:tiny", ["--config.train.grad_accum_steps=2"], "GradCache"),
        (
            "configs/contrastive.py:tiny",
            ["--config.train.max_rows_per_device=1"],
            "train.max_rows_per_device=1 (set it to 0) splits the batch",
        ),
        ("configs/contrastive.py:tiny", ["--config.contrastive.pooling=max"], "pooling"),
        ("configs/lm.py:tiny", ["--config.data.source=npy"], "data.path"),
        ("configs/contrastive.py:tiny", ["--config.data.global_batch_size=512"], "fewer than one batch"),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_written(config_file, overrides, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["train", f"--config={config_file}", f"--workdir={workdir}", *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not workdir.exists()


def test_a_tokenizer_without_a_mask_token_needs_one_configured(tmp_path, capsys, text_files):
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer(DOCS[:20], 300)
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", bos_token="<bos>")
    plain.save_pretrained(tmp_path / "tok")
    run = ["train", "--config=configs/mntp.py:tiny", f"--workdir={tmp_path / 'run'}", "--config.data.source=text"]
    run.append(f"--config.data.tokenizer={tmp_path / 'tok'}")
    data = f"--config.data.path={text_files / 'docs.txt'}"
    cases = [
        ([data], "has no mask token"),
        (["--config.mntp.mask_token=<unk>"], "data.path"),
        ([data, "--config.mntp.mask_token=<unk>", "--config.model.vocab_size=256"], "embedding"),  # tokenizer > model
    ]
    for args, message in cases:
        assert main([*run, *args]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
    assert main([*run, data, "--config.mntp.mask_token=<unk>", "--config.train.steps=2"]) == 0


@pytest.mark.slow
def test_fine_tuning_through_the_engine_validates_keeps_the_best_step_and_exports(tmp_path):
    """A tiny classification run: validation every 40 steps logged as eval/*, the best step kept, and the run
    exported to transformers' own sequence-classification class (last-token pooling)."""
    import torch
    import transformers

    from bidirlm_jax.configs import finetune as finetune_configs
    from bidirlm_jax.evals.registry import EVALUATORS
    from bidirlm_jax.io.heads import read_best

    config = _quiet(finetune_configs.get_config("tiny"))
    config.finetune.pooling = "last"
    config.train.steps = 80
    train(config, str(tmp_path / "run"), evaluators=EVALUATORS)
    evaluated = [r for r in metrics_of(tmp_path / "run") if "eval/accuracy" in r]
    assert [r["step"] for r in evaluated] == [40, 80]
    assert evaluated[-1]["eval/accuracy"] > 0.8  # a two-way task: chance is 0.5
    best = read_best(tmp_path / "run")
    assert best["metrics"]["accuracy"] == max(r["eval/accuracy"] for r in evaluated)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "classifier")]) == 0
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "classifier")
    with torch.no_grad():
        logits = reloaded(**tokenizer(["a short text"], return_tensors="pt")).logits
    assert logits.shape == (1, reloaded.config.num_labels) and torch.isfinite(logits).all()
