"""The MTEB adapter: mteb's encoder protocol, BidirLM's instructions on queries only, a name and revision per
checkpoint, and a local retrieval task run offline whose scores equal `bidirlm eval`'s."""

import logging

import pytest

mteb = pytest.importorskip("mteb")

from mteb.models.models_protocols import EncoderProtocol  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from bidirlm_jax.errors import ConfigError  # noqa: E402
from bidirlm_jax.evals.mteb import MTEBEncoder, beir_task, checkpoint_revision, run_mteb  # noqa: E402
from bidirlm_jax.evals.retrieval import evaluate_retrieval  # noqa: E402
from bidirlm_jax.io.sentence_transformers import export_encoder  # noqa: E402
from tests.encoders import (  # noqa: E402
    MAX_LENGTH,
    make_beir,
    make_encoder_src,
    run_cli,
)

INSTRUCTION = "Given a query, retrieve documents that answer the query."


@pytest.fixture(scope="module")
def encoder_dir(qwen_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mteb")
    return export_encoder(make_encoder_src(qwen_dir, root / "src"), root / "encoder", max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def adapter(encoder_dir):
    return MTEBEncoder.from_pretrained(encoder_dir, batch_size=8)


def test_protocol_name_and_revision(adapter, encoder_dir, tmp_path):
    assert isinstance(adapter, EncoderProtocol)
    meta = adapter.mteb_model_meta
    assert meta.name == "bidirlm-jax/encoder" and meta.embed_dim == 64 and meta.max_tokens == MAX_LENGTH
    assert meta.revision == checkpoint_revision(encoder_dir, _settings(adapter))  # deterministic
    # a different checkpoint, or the same one embedded differently, never shares a revision
    other = export_encoder(encoder_dir, tmp_path / "encoder", max_length=MAX_LENGTH, pooling="last")
    assert checkpoint_revision(other, _settings(adapter)) != meta.revision
    shorter = MTEBEncoder.from_loaded(encoder_dir, adapter.model, adapter.tokenizer, max_length=32)
    assert shorter.mteb_model_meta.revision != meta.revision
    with pytest.raises(ConfigError, match="organization/model"):
        MTEBEncoder(adapter.model, adapter.tokenizer, name="unnamed", revision="x")


def _settings(adapter):
    from bidirlm_jax.evals.mteb import bidirlm_instructions

    return dict(
        pooling="mean",
        normalize=True,
        max_length=MAX_LENGTH,
        attention="bidirectional",
        dtype="float32",
        instructions=sorted(bidirlm_instructions().items()),
    )


def test_bidirlm_instruction_table(adapter):
    scifact = mteb.get_task("SciFact").metadata  # metadata only: no data is loaded
    assert (
        adapter.instruction(scifact, PromptType.query)
        == "Given a scientific claim, retrieve documents that support or refute the claim"
    )
    assert adapter.instruction(scifact, PromptType.document) is None  # documents are never instructed
    assert adapter.instruction(mteb.get_task("Tatoeba").metadata, None) == "Retrieve semantically similar text."
    # tasks the table lacks: the paper's defaults by task type, on both sides of symmetric tasks
    assert adapter.instruction(mteb.get_task("STSBenchmark.v2").metadata, None) == "Retrieve semantically similar text"
    bitext = mteb.get_task("TbilisiCityHallBitextMining").metadata
    assert adapter.instruction(bitext, None) == "Retrieve parallel sentences"


def test_local_retrieval_task_equals_bidirlm_eval(adapter, encoder_dir, tmp_path, caplog):
    """mteb's pipeline (its dataloaders, title join, search and pytrec_eval) on a local BEIR directory, offline."""
    beir = make_beir(tmp_path / "beir")
    task = beir_task(beir, instruction=INSTRUCTION)
    with caplog.at_level(logging.INFO, logger="bidirlm_jax.evals.mteb"):
        results = run_mteb(adapter, [task])
    scores = results["LocalBEIRRetrieval"]["scores"]["test"]["default"]
    assert adapter.prompts_used == {
        ("LocalBEIRRetrieval", "query"): INSTRUCTION,
        ("LocalBEIRRetrieval", "document"): None,
    }
    assert f"LocalBEIRRetrieval, query texts: instruction {INSTRUCTION!r}" in caplog.text
    ours = evaluate_retrieval(adapter.model, adapter.tokenizer, beir, instruction=INSTRUCTION, max_length=MAX_LENGTH)
    assert results["LocalBEIRRetrieval"]["main_score"] == pytest.approx(ours["ndcg_at_10"], abs=1e-5)  # mteb rounds
    for metric in ("ndcg_at_10", "mrr_at_10", "recall_at_100"):
        assert scores[metric] == pytest.approx(ours[metric], abs=1e-5), metric


def test_eval_cli_mteb_task_without_local_data(encoder_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-datasets"))
    assert run_cli(["eval", "--model", encoder_dir, "--mteb", "SciFact", "--max-length", MAX_LENGTH]) == 2
    err = capsys.readouterr().err
    assert "the data of mteb task SciFact is not available locally" in err and "--beir DIR" in err
    assert run_cli(["eval", "--model", encoder_dir, "--mteb", "NoSuchTask"]) == 2
    assert "'NoSuchTask' is not an mteb task" in capsys.readouterr().err
