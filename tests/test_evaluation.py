"""`config.evals`: evaluations named in a registry (kind → factory) that the engine's caller passes, the
deprecated objective keys mapped into it, and the schedule that runs them and keeps the best step."""

import logging

import pytest
from ml_collections import ConfigDict

from bidirlm_jax.configs import finetune as finetune_configs
from bidirlm_jax.configs import mntp as mntp_configs
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.evals.registry import EVALUATORS, Evaluator
from bidirlm_jax.train.evaluation import Schedule, build_evaluations, eval_specs
from bidirlm_jax.train.preflight import input_paths


def test_the_configs_name_their_evaluations():
    mntp, finetune = mntp_configs.get_config("tiny"), finetune_configs.get_config("tiny")
    assert mntp.evals.held_out.kind == "mntp" and finetune.evals.validation.kind == "finetune"
    assert {e.kind for c in (mntp, finetune) for e in c.evals.values()} <= set(EVALUATORS)  # every kind registered
    assert eval_specs(mntp) == {}  # held-out sets are off until given data
    assert eval_specs(finetune)["validation"].every == 40
    assert finetune_configs.get_config("xnli").evals.validation.every == 500


def test_deprecated_keys_map_into_their_entries(caplog):
    config = mntp_configs.get_config("tiny")
    config.mntp.update(eval_data="en:/data/en.jsonl", eval_every=5)
    with caplog.at_level(logging.WARNING, logger="bidirlm_jax.train.evaluation"):
        spec = eval_specs(config)["held_out"]
    assert (spec.kind, spec.data, spec.every, spec.texts) == ("mntp", "en:/data/en.jsonl", 5, 256)
    assert "--config.mntp.eval_data is deprecated: it sets evals.held_out.data" in caplog.text
    assert config.evals.held_out.data == ""  # the config itself is left as given

    config = finetune_configs.get_config("tiny")
    config.finetune.update(validation_path="", eval_every=7, best_metric="macro_f1")
    spec = eval_specs(config)["validation"]
    assert (spec.data, spec.every, spec.best_metric) == ("auto", 7, "macro_f1")  # "" meant: the dataset's own split
    del config.evals["validation"]
    with pytest.raises(ConfigError, match=r"finetune.validation_path is deprecated .* no evals.validation entry"):
        eval_specs(config)


def test_the_engine_needs_the_registry_for_an_entry_that_is_on():
    config = mntp_configs.get_config("tiny")
    assert build_evaluations(config, None, None) == []  # nothing on: nothing needed
    config.evals.held_out.data = "en:/data/en.jsonl"
    with pytest.raises(ConfigError, match=r"names evaluations \(held_out\) but no evaluators were given"):
        build_evaluations(config, None, None)
    config.evals.held_out.kind = "perplexity"
    with pytest.raises(
        ConfigError, match=r"evals.held_out.kind='perplexity' is not one of \['finetune', 'mntp', 'retrieval'\]"
    ):
        build_evaluations(config, None, EVALUATORS)
    config.evals.held_out.update(kind="mntp", every=-1)
    with pytest.raises(ConfigError, match="evals.held_out.every must be 0"):
        build_evaluations(config, None, EVALUATORS)


def _registry(calls):
    """A registry of one kind whose evaluations record when they ran and score the step they are told."""

    def factory(name, spec, config, objective):
        def run(model):
            calls.append((name, model))
            return {f"{name}/score": float(model), **({"score": float(model)} if spec.get("best") else {})}

        return Evaluator(name, run, every=spec.every, best_metric="score" if spec.get("best") else "")

    return {"fake": factory}


def test_each_evaluation_keeps_its_own_schedule_and_one_keeps_the_best(tmp_path, monkeypatch):
    config = ConfigDict(
        {
            "evals": {
                "a": dict(kind="fake", data="x", every=2, best=True),
                "b": dict(kind="fake", data="y", every=3, best=False),
                "off": dict(kind="fake", data="", every=1, best=False),
            }
        }
    )
    calls = []
    evaluations = build_evaluations(config, None, _registry(calls))
    assert [e.name for e in evaluations] == ["a", "b"]
    kept = []
    monkeypatch.setattr("bidirlm_jax.train.checkpoints.save_best", lambda w, p, step, metrics: kept.append(step))
    schedule = Schedule(evaluations, tmp_path, last_step=7)
    due = [step for step in range(1, 8) if schedule.due(step)]
    assert due == [2, 3, 4, 6, 7]
    scores = {step: schedule.run(step, model=10 - step, params=None) for step in due}
    assert scores[6] == {"eval/a/score": 4.0, "eval/score": 4.0, "eval/b/score": 4.0}
    assert scores[3] == {"eval/b/score": 7.0}
    assert [name for name, _ in calls] == ["a", "b", "a", "a", "b", "a", "b"]
    assert kept == [2]  # a's score falls after step 2 (10 - step): the best step stays 2

    config.evals.b.best = True
    with pytest.raises(ConfigError, match=r"evaluations \['a', 'b'\] each name a best_metric"):
        build_evaluations(config, None, _registry([]))


def test_preflight_lists_the_evaluations_files():
    config = mntp_configs.get_config("tiny")
    config.evals.held_out.data = "en:/data/en.jsonl;hub:hf:user/set"
    assert ("evals.held_out.data", "/data/en.jsonl") in input_paths(config)
    assert not [p for k, p in input_paths(config) if "user/set" in p]  # hub sets are not local files
    config = finetune_configs.get_config("tiny")
    assert not [k for k, _ in input_paths(config) if k.startswith("evals.")]  # "auto" names no file
    config.evals.validation.data = "/data/valid.jsonl"
    assert ("evals.validation.data", "/data/valid.jsonl") in input_paths(config)


def test_deprecated_keys_still_parse_from_the_command_line():
    """`--config.finetune.eval_every=4` as users typed it before `config.evals`: parsed (an int) and mapped."""
    from bidirlm_jax import configs
    from bidirlm_jax.train.config import parse_train_args

    argv = [
        "--config",
        "finetune:tiny",
        "--workdir",
        "/tmp/unused",
        "--config.finetune.eval_every=4",
        "--config.finetune.validation_path=/d/v.jsonl",
        "--config.evals.validation.batch_size=8",
    ]
    config, _ = parse_train_args(configs.resolve_args(argv))
    spec = eval_specs(config)["validation"]
    assert (spec.every, spec.data, spec.batch_size) == (4, "/d/v.jsonl", 8)
