"""Fine-tuning objectives through the engine's own step (driven here, as the loop will): a tiny run
learns a generated task, the losses are the per-example / per-labelled-token sums the engine divides,
evaluation scores the validation split, and bad inputs are refused before anything is written."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from bidirlm_jax import sharding
from bidirlm_jax.configs.finetune import PRESETS, get_config
from bidirlm_jax.data import labeled_synthetic
from bidirlm_jax.data.loader import DeviceBatches
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.evals import finetune as evals_finetune
from bidirlm_jax.evals.registry import EVALUATORS
from bidirlm_jax.io.run import HEAD_FILE
from bidirlm_jax.io.tokenizer import load_tokenizer, train_tokenizer
from bidirlm_jax.losses import classification
from bidirlm_jax.models.heads import IGNORE_INDEX, EncoderWithHead, HeadConfig
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.train.evaluation import build_evaluations
from bidirlm_jax.train.loop import model_config
from bidirlm_jax.train.objectives import finetune
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import TrainState
from bidirlm_jax.train.step import jit_step, make_step_fn


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A 512-token BPE (tiny-gemma3's vocabulary) trained on every generated task's text."""
    texts = [
        t
        for task in finetune.OBJECTIVES
        for t in labeled_synthetic.synthetic_texts(labeled_synthetic.synthetic_split(task, 300, seed=0))
    ]
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(texts, 512, out)
    return out


def _config(objective="classification", tokenizer_dir=None, validation=None, **finetune_settings):
    c = get_config("tiny")
    c.objective = objective
    if tokenizer_dir is not None:
        c.data.tokenizer = str(tokenizer_dir)
    c.finetune.update(finetune_settings)
    c.evals.validation.update(validation or {})
    return c


def _validation(config, objective):
    """The run's validation evaluation, as the engine builds it from `config.evals`."""
    (evaluation,) = build_evaluations(config, objective, EVALUATORS)
    return evaluation


def _build(config, workdir):
    """The objective and its validation, built (and checked) as the engine's plan does before any step."""
    objective = finetune.build(config, model_config(config.model), workdir=workdir)
    _validation(config, objective)
    return objective


def _drive(objective, config, steps: int, mesh_shape=(8, 1, 1)):
    """What the loop does with a fine-tuning objective: the train state around `model_factory`'s model,
    placed in its shardings, and the jitted step on the objective's batches."""
    mesh = make_mesh(*mesh_shape)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    factory = objective.model_factory
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))

    def init():
        params = nnx.state(factory(nnx.Rngs(config.train.seed)), nnx.Param)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(1))

    shardings = sharding.state_shardings(jax.eval_shape(init), mesh)
    state = jax.jit(init, out_shardings=shardings)()
    batches = DeviceBatches(objective.rows, mesh, config.data.global_batch_size)
    evaluate = _validation(config, objective)
    step = jit_step(make_step_fn(graphdef, objective.grad_fn, tx, schedule), shardings, mesh)
    logs = []
    with jax.set_mesh(mesh):
        before = evaluate(nnx.merge(graphdef, state.params))
        for _ in range(steps):
            state, out = step(state, next(batches))
            logs.append({k: float(v) for k, v in jax.device_get(out).items()})
        after = evaluate(nnx.merge(graphdef, state.params))
    return before, after, logs


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective, metric, steps, floor",
    [("classification", "accuracy", 40, 0.85), ("token_classification", "f1", 40, 0.7)],
)
def test_tiny_run_learns(tmp_path, tokenizer_dir, objective, metric, steps, floor):
    config = _config(objective, tokenizer_dir)
    obj = _build(config, tmp_path)
    before, after, logs = _drive(obj, config, steps)
    assert all(log["finite"] == 1.0 for log in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    # chance is 0.5 for the balanced fruit task; entity F1 of an untrained tagger is near 0
    assert after[metric] > floor and after[metric] > before[metric] + 0.2, (before, after)
    assert after["examples"] == config.finetune.synthetic_validation_size
    assert list(tmp_path.iterdir()) == []  # building and training write nothing; the loop writes run_files


def _fake_model(logits):
    class Out:
        pass

    def model(ids, mask, rng=None):
        out = Out()
        out.logits = logits
        return out

    return model


def test_losses_are_sums_the_engine_divides():
    logits = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    batch = {"input_ids": jnp.zeros((2, 4), jnp.int32), "attention_mask": jnp.ones((2, 4), jnp.int32),
             "labels": jnp.asarray([0, 2])}  # fmt: skip
    loss, count, metrics = classification.classification_loss(_fake_model(logits), batch, None)
    # Cross-entropy from its definition, log Σ exp(logits) − logit[label], one term per row
    expected = math.log(math.exp(2) + 1 + math.exp(-1)) - 2 + math.log(1 + math.e + math.exp(0.5)) - 0.5
    assert float(loss) == pytest.approx(
        expected, rel=1e-6
    )  # fp32 exp/log of 3 logits: a few ulps and float(count) == 2 and float(metrics["accuracy"]) == 1

    batch["labels"] = jnp.asarray([0.5, -1.0])
    loss, count, metrics = classification.regression_loss(_fake_model(jnp.asarray([1.0, 1.0])), batch, None)
    assert float(loss) == pytest.approx(0.25 + 4.0) and float(count) == 2 and float(metrics["abs_error"]) == 2.5

    token_logits = jnp.zeros((1, 4, 3)).at[0, 1, 2].set(5.0)
    batch["labels"] = jnp.asarray([[IGNORE_INDEX, 2, 0, IGNORE_INDEX]])
    loss, count, metrics = classification.token_classification_loss(_fake_model(token_logits), batch, None)
    per = math.log(2 + math.exp(5)) - 5 + math.log(3)  # token 1 (label 2, logit 5) and token 2 (all zero)
    assert float(loss) == pytest.approx(per, rel=1e-6) and float(count) == 2 and float(metrics["accuracy"]) == 2


def test_objective_brings_model_params_evaluation_and_run_files(tmp_path, tokenizer_dir):
    config = _config("classification", tokenizer_dir, pooling="late", labels="none,fruit")
    obj = _build(config, tmp_path)
    assert obj.head == HeadConfig("classification", 2, pooling="late", dropout=0.0)
    validation = _validation(config, obj)
    assert obj.label_map.names == ("none", "fruit") and validation.best_metric == "accuracy" and validation.every == 40
    row = obj.rows[0]
    assert row["input_ids"].shape == (32,) and row["input_ids"].dtype == np.int32 and row["labels"].shape == ()
    assert obj.flops_per_step > 0 and obj.tokens_per_step == 16 * 32

    model = obj.model_factory(nnx.Rngs(0))
    assert isinstance(model, EncoderWithHead)
    params = obj.init_params(nnx.state(model.encoder, nnx.Param))
    assert jax.tree.structure(params) == jax.tree.structure(nnx.state(model, nnx.Param))

    description = json.loads(obj.run_files[HEAD_FILE])
    assert description["head"] == obj.head.to_json() and description["labels"] == ["none", "fruit"]
    assert description["label2id"] == {"none": 0, "fruit": 1} and description["max_length"] == 32
    assert description["stream"]["word_separator"] == " "

    # the standalone evaluation (any split, tokenised as training does) equals the objective's
    split = labeled_synthetic.synthetic_split("classification", 256, seed=0, name="validation")
    tokenizer = load_tokenizer(tokenizer_dir)
    direct = evals_finetune.evaluate(model, tokenizer, split, label_map=obj.label_map, max_length=32, batch_size=7)
    assert direct == pytest.approx(validation(model))
    assert set(direct) == {"accuracy", "macro_f1", "loss", "examples", "truncated"}


def test_the_classifier_setting_picks_the_head(tmp_path, tokenizer_dir):
    build = lambda objective, **kw: _build(_config(objective, tokenizer_dir, **kw), tmp_path / objective)
    assert build("classification").head.classifier == "linear"  # auto, mean pooling: the probe
    head = build("regression", classifier="eurobert").head
    assert head == HeadConfig("regression", 1, pooling="mean", classifier="eurobert")
    model = build("classification", classifier="eurobert").model_factory(nnx.Rngs(0))
    names = {p[0] for p, _ in nnx.to_flat_state(nnx.state(model.head, nnx.Param))}
    assert names == {"dense", "dense_bias", "classifier", "classifier_bias"}
    for objective, kw, message in (
        ("classification", dict(classifier="mlp"), "finetune.classifier='mlp' is not one of"),
        ("token_classification", dict(classifier="eurobert"), "finetune.classifier='eurobert' applies to sequence"),
        ("classification", dict(pooling="late", classifier="linear"), "set finetune.classifier=eurobert"),
    ):
        with pytest.raises(ConfigError, match=message):
            build(objective, **kw)


def test_a_label_count_that_disagrees_with_the_head_is_refused(tmp_path, tokenizer_dir):
    obj = _build(_config("classification", tokenizer_dir), tmp_path)
    model = EncoderWithHead(model_config(_config().model), HeadConfig("classification", 3), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="head has 3 outputs but the label map has 2 labels"):
        evals_finetune.evaluate(model, load_tokenizer(tokenizer_dir), labeled_synthetic.synthetic_split("classification", 4, seed=0),
                          label_map=obj.label_map)  # fmt: skip
    with pytest.raises(ConfigError, match=r"finetune.num_labels=3 but the classification data has 2 labels"):
        _build(_config("classification", tokenizer_dir, num_labels=3), tmp_path)


def _files(tmp_path, train, validation):
    def write(name, records):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    return write("train.jsonl", train), write("valid.jsonl", validation)


GOOD = [{"text": "a dog", "label": "pos"}, {"text": "a cat", "label": "neg"}]


@pytest.mark.parametrize(
    "objective, validation, settings, message",
    [
        ("classification", [{"text": "x", "label": "maybe"}], {}, r"valid.jsonl:1: label 'maybe' is not one of"),
        ("classification", [], {}, r"validation split .* holds no examples"),
        ("classify", GOOD, {}, "objective 'classify' is not a fine-tuning task"),
        ("classification", GOOD, {"pooling": "max"}, "finetune.pooling='max' is not one of"),
        ("classification", GOOD, {"best_metric": "mse"}, "evals.validation.best_metric='mse' is not one of"),
        ("classification", GOOD, {"data": "auto"}, "evaluates on a validation split"),
        ("regression", GOOD, {}, "regression label 'label'='pos' is not a number"),
        ("token_classification", GOOD, {"pooling": "last"}, "applies to sequence tasks"),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, tokenizer_dir, objective, validation, settings,
                                                           message):  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    train, valid = _files(data, GOOD, validation)
    config = _config(objective, tokenizer_dir, validation={"data": valid})
    validation_keys = ("best_metric", "data")  # evals.validation's; the rest are finetune.*
    config.evals.validation.update({k: v for k, v in settings.items() if k in validation_keys})
    config.finetune.update({k: v for k, v in settings.items() if k not in validation_keys})
    config.data.update(source="labeled", path=train)
    workdir = tmp_path / "run"
    workdir.mkdir()
    with pytest.raises(ConfigError, match=message):
        _build(config, workdir)
    assert list(workdir.iterdir()) == []


def test_other_bad_settings(tmp_path, tokenizer_dir):
    config = _config("classification", tokenizer_dir)
    config.data.source = "text"
    with pytest.raises(ConfigError, match="data.source='text' is not one of"):
        _build(config, tmp_path)
    config = _config("classification")
    config.data.source = "labeled"
    with pytest.raises(ConfigError, match="needs --config.data.path"):
        _build(config, tmp_path)
    data = tmp_path / "d"
    data.mkdir()
    config.data.path, config.evals.validation.data = _files(data, GOOD, GOOD)
    with pytest.raises(ConfigError, match="needs the checkpoint's tokenizer"):
        _build(config, tmp_path)
    config.model.scan_layers = True
    with pytest.raises(ConfigError, match="scan_layers=True is not supported for fine-tuning"):
        _build(config, tmp_path)
    config.model.scan_layers = False
    del config["finetune"]
    with pytest.raises(ConfigError, match="use configs/finetune.py"):
        _build(config, tmp_path)
    with pytest.raises(ConfigError, match="unknown preset 'xnli2'"):
        get_config("xnli2")


def test_a_resumed_run_keeps_its_head_and_labels(tmp_path, tokenizer_dir):
    obj = _build(_config("classification", tokenizer_dir), tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / HEAD_FILE).write_text(obj.run_files[HEAD_FILE])
    assert _build(_config("classification", tokenizer_dir), tmp_path).label_map == obj.label_map
    with pytest.raises(ConfigError, match="holds a fine-tuning run with head"):
        _build(_config("classification", tokenizer_dir, labels="none,fruit"), tmp_path)
    with pytest.raises(ConfigError, match="read other training rows: finetune.synthetic_train_size: 2048 -> 1024"):
        _build(_config("classification", tokenizer_dir, synthetic_train_size=1024), tmp_path)
    assert list((tmp_path / "model").iterdir()) == [tmp_path / "model" / HEAD_FILE]  # nothing written by refusals


def test_presets_are_complete():
    for preset in PRESETS:
        c = get_config(preset)
        assert c.objective in finetune.OBJECTIVES and c.finetune.pooling in finetune.POOLINGS
    assert get_config("pan-x").finetune.tags_field == "ner_tags" and get_config("xnli").optim.warmup_steps == 1000


def test_a_second_finetune_evaluation_logs_under_its_name_and_keeps_no_best_step(tmp_path, tokenizer_dir):
    """A test set beside the validation (`evals.heldout`, here the same generated split): its scores are
    logged as eval/heldout/*, the validation's as eval/*, and only the validation keeps the best step."""
    from bidirlm_jax.train.evaluation import Schedule

    config = _config("classification", tokenizer_dir)
    config.evals.heldout = ConfigDict(config.evals.validation.to_dict())
    obj = finetune.build(config, model_config(config.model), workdir=tmp_path)
    built = {e.name: e for e in build_evaluations(config, obj, EVALUATORS)}
    validation, heldout = built["validation"], built["heldout"]
    assert (validation.prefix, validation.best_metric) == ("", "accuracy")
    assert (heldout.prefix, heldout.best_metric) == ("heldout/", "")
    model = obj.model_factory(nnx.Rngs(0))
    logged = Schedule([validation, heldout], tmp_path, last_step=1).run(1, model, nnx.state(model, nnx.Param))
    scores = {"accuracy", "macro_f1", "loss", "examples", "truncated"}
    assert set(logged) == {f"eval/{k}" for k in scores} | {f"eval/heldout/{k}" for k in scores}
    assert all(logged[f"eval/heldout/{k}"] == logged[f"eval/{k}"] for k in scores)
