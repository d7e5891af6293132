"""Held-out MNTP loss per domain: the sets' spec, the stdlib code domain, and MNTP runs that log
`eval/loss/NAME` during training (the forgetting curves of notebooks/forgetting.ipynb)."""

import json
import logging

import pytest

import bidirlm_jax
from bidirlm_jax.configs import mntp as mntp_configs
from bidirlm_jax.data.stdlib_text import stdlib_code, stdlib_docstrings
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.evals.lm import evaluate_domains, parse_domains, read_domains
from bidirlm_jax.evals.registry import EVALUATORS
from bidirlm_jax.io.tokenizer import load_tokenizer, train_tokenizer
from bidirlm_jax.train import train

ENGLISH = [doc for _, doc in stdlib_docstrings()][:80]
CODE = [block for _, block in stdlib_code()][:80]


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    for name, texts in (("english", ENGLISH), ("code", CODE)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer(ENGLISH + CODE, 512, root / "tokenizer")
    return root


def test_spec_and_reading(domains):
    spec = f"english:{domains / 'english.jsonl'};code:{domains / 'code.jsonl'}"
    assert parse_domains(spec) == [("english", str(domains / "english.jsonl")), ("code", str(domains / "code.jsonl"))]
    assert parse_domains("hub:hf:user/set") == [("hub", "hf:user/set")]  # the path keeps its colons
    texts = read_domains(spec, max_texts=5)
    assert list(texts) == ["english", "code"] and texts["code"] == CODE[:5]
    for bad, match in [("english", "NAME:PATH"), (":x.txt", "NAME:PATH"), ("a:x;a:y", "unique")]:
        with pytest.raises(ConfigError, match=match):
            parse_domains(bad)
    with pytest.raises(ConfigError, match="max_texts"):
        read_domains(spec, max_texts=0)


def test_stdlib_code_is_functions_and_classes():
    blocks = stdlib_code(max_chars=500)
    assert len(blocks) > 1000 and all(len(b) <= 500 for _, b in blocks)
    assert all(b.startswith(("def ", "async def ", "class ", "@")) for _, b in blocks)
    assert any(m == "json.decoder" and b.startswith("class JSONDecoder") for m, b in blocks)


def test_mntp_run_logs_the_held_out_loss_of_each_domain(domains, tmp_path, caplog):
    config = mntp_configs.get_config("tiny")
    config.data.update(source="text", path=str(domains / "english.jsonl"), tokenizer=str(domains / "tokenizer"))
    config.data.update(seq_len=32, global_batch_size=8)
    spec = f"english:{domains / 'english.jsonl'};code:{domains / 'code.jsonl'}"
    config.evals.held_out.update(data=spec, every=2, texts=12)
    config.train.update(steps=5, checkpoint_every=5, log_every=5)
    config.metrics.update(progress_bar=False, tensorboard=False)
    workdir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="bidirlm_jax.train"):
        train(config, str(workdir), evaluators=EVALUATORS)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evaluated = {r["step"]: r for r in rows if "eval/loss/code" in r}
    assert sorted(evaluated) == [2, 4, 5]  # every eval_every steps and at the last one
    lines = [m for m in caplog.messages if m.startswith("eval at step ")]  # the run's log lines say the same
    assert [m.split(":")[0] for m in lines] == ["eval at step 2", "eval at step 4", "eval at step 5"]
    assert f"eval/loss/code {evaluated[5]['eval/loss/code']:.4f}" in lines[-1]
    assert not (workdir / "best").exists()  # nothing to select: held-out loss is a measurement here
    model = bidirlm_jax.from_pretrained(workdir, attention="bidirectional")
    again = evaluate_domains(
        model, load_tokenizer(workdir / "model"), read_domains(spec, max_texts=12), max_length=32, seed=0
    )
    for key, value in again.items():
        # the same evaluation in another process: the vocabulary's log-softmax and the 64-wide layers regrouped
        assert evaluated[5][f"eval/{key}"] == pytest.approx(value, rel=1e-5), key


def test_write_domains_splits_by_package(tmp_path):
    from bidirlm_jax.data.sources import iter_documents
    from bidirlm_jax.pipeline.corpus import write_domains

    files = write_domains(tmp_path, max_train=30, max_held_out=10)
    assert sorted(files) == ["code", "english"]
    for name, split in files.items():
        train, held = list(iter_documents(split["train"])), list(iter_documents(split["held_out"]))
        assert len(train) == 30 and len(held) == 10, name
        assert not set(train) & set(held), name
    code = list(iter_documents(files["code"]["train"]))
    assert all(t.startswith(("def ", "async def ", "class ", "@")) for t in code)
