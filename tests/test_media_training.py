"""Image–text, audio–text and Omni contrastive training (`configs/contrastive.py:tiny-image`, `:tiny-audio`,
`:tiny-omni`): the runs learn (a held-out retrieval beats the untrained model), a frozen tower leaves training bit-identical,
and bad media data is refused before anything is written. (SIGKILL and restart: test_objectives_resume.)

Held-out sets are other views of the training material: other crops of the same photographs, other
renderings (speed, pitch) of the same sentences; untrained = the same architecture at its random init.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import skimage.data
import transformers
from flax import nnx

import bidirlm_jax
from bidirlm_jax.cli import main
from bidirlm_jax.configs.contrastive import get_config
from bidirlm_jax.data.media.items import media_processor
from bidirlm_jax.data.media.samples import CAPTIONS, sample_image_pairs
from bidirlm_jax.embed.encode import encode
from bidirlm_jax.io.model_types import model_type_of
from bidirlm_jax.io.tokenizer import load_tokenizer, train_tokenizer
from bidirlm_jax.models.towers.presets import get_tower_preset
from bidirlm_jax.testing import media
from bidirlm_jax.testing import qwen3_vl as vl_ref
from bidirlm_jax.train.config import run_settings
from bidirlm_jax.train.loop import train
from tests.runs import checkpoint_tree, metrics_of

QUIET = {"metrics.progress_bar": False, "metrics.tensorboard": False}


def _config(preset: str, **overrides):
    c = get_config(preset)
    for key, value in {**QUIET, **overrides}.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def _untrained(config):
    """The preset's model at the run's random init (as the train state initialises it, up to jit's rounding)."""
    model = get_tower_preset(config.model.preset)
    return model_type_of(model).model_class(model, run_settings(config.model), rngs=nnx.Rngs(config.train.seed))


def _top1(model, processor, queries, documents, truth) -> float:
    q, d = encode(model, processor, queries), encode(model, processor, documents)
    return float((np.argmax(q @ d.T, axis=1) == truth).mean())


def _accuracy_rises(workdir) -> None:
    accuracy = [r["in_batch_accuracy"] for r in metrics_of(workdir) if "in_batch_accuracy" in r]
    tenth = len(accuracy) // 4
    assert np.mean(accuracy[-tenth:]) > np.mean(accuracy[:tenth]) + 0.15, accuracy


@pytest.mark.slow
def test_an_image_text_run_learns_and_keeps_its_frozen_tower(tmp_path):
    config = _config("tiny-image")
    train(config, str(tmp_path))
    _accuracy_rises(tmp_path)
    trained, fresh = bidirlm_jax.from_pretrained(tmp_path), _untrained(config)
    tokenizer = load_tokenizer(tmp_path / "model")
    held_out = sample_image_pairs(crops=2, seed=123)
    captions = sorted(set(CAPTIONS.values()))
    truth = np.asarray([captions.index(caption) for caption, _ in held_out])
    scores = {}
    for name, model in (("trained", trained), ("untrained", fresh)):
        processor = media_processor(model, tokenizer, max_pixels=config.contrastive.max_pixels)
        scores[name] = _top1(model, processor, [image for _, image in held_out], captions, truth)
    assert scores["trained"] >= scores["untrained"] + 0.2, scores
    settings = json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())
    assert settings["size"]["longest_edge"] == config.contrastive.max_pixels
    _towers_stayed(tmp_path, (30, 60), ("visual",))


@pytest.mark.slow
def test_an_audio_text_run_learns(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")
    from bidirlm_jax.data.media.speech import SENTENCES, spoken_pairs

    config = _config("tiny-audio")
    train(config, str(tmp_path))
    _accuracy_rises(tmp_path)
    trained, fresh = bidirlm_jax.from_pretrained(tmp_path), _untrained(config)
    tokenizer = load_tokenizer(tmp_path / "model")
    held_out = spoken_pairs(variants=3, seed=123)
    truth = np.repeat(np.arange(len(SENTENCES)), 3)
    scores = {}
    for name, model in (("trained", trained), ("untrained", fresh)):
        processor = media_processor(model, tokenizer, max_seconds=config.contrastive.max_seconds)
        scores[name] = _top1(model, processor, [clip for clip, _ in held_out], list(SENTENCES), truth)
    assert scores["trained"] >= scores["untrained"] + 0.2, scores  # 5 more of 24 clips


@pytest.fixture(scope="module")
def vl_checkpoint(tmp_path_factory):
    """A tiny transformers Qwen3-VL (with its LM head) with the media tokenizer and a preprocessor_config.json."""
    path = tmp_path_factory.mktemp("vl_init")
    config = vl_ref.qwen3_vl_config(causal=False, deepstack=(0, 1))
    vl_ref.randomize(transformers.Qwen3VLForConditionalGeneration(config)).save_pretrained(path)
    media.media_tokenizer().save_pretrained(path)
    size = {"shortest_edge": 32 * 32, "longest_edge": 96 * 96}
    (path / "preprocessor_config.json").write_text(json.dumps({"size": size}))
    return path


def test_a_run_from_a_vl_checkpoint_trains_the_text_stack_only(vl_checkpoint, tmp_path):
    config = _config(
        "tiny-image",
        **{"model.init_from": str(vl_checkpoint), "train.steps": 4, "train.checkpoint_every": 4},
    )
    config.contrastive.max_pixels = 64 * 64
    train(config, str(tmp_path))
    before, after = bidirlm_jax.from_pretrained(vl_checkpoint), bidirlm_jax.from_pretrained(tmp_path)
    leaves = lambda module: jax.tree.leaves(nnx.state(module, nnx.Param))
    for a, b in zip(leaves(before.visual), leaves(after.visual), strict=True):
        np.testing.assert_array_equal(a, b)  # the frozen tower, bit for bit
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(before.text), leaves(after.text)))
    carried = json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())
    assert carried["size"]["longest_edge"] == 96 * 96  # the checkpoint's inference settings travel with it


def _pairs(tmp_path, records) -> str:
    (tmp_path / "img").mkdir(exist_ok=True)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize(
    "preset, record, message",
    [
        ("tiny", {"query": "a cat", "positive": {"image": "cat.png"}}, r"pairs\.jsonl:1: image file not found"),
        ("tiny", {"query": "a cat", "positive": {"image": "img/a.png"}}, "holds image but the model has no such tower"),
        ("tiny-image", {"query": "a cat", "positive": {"image": "img/bad.png"}}, r"pairs\.jsonl:\d+: cannot decode"),
        ("tiny-image", {"query": "a cat", "positive": {"picture": "img/a.png"}}, r'"positive" is not a string or'),
    ],
)
def test_bad_media_data_is_refused_before_anything_is_written(tmp_path, capsys, preset, record, message):
    data = _pairs(tmp_path, [record] * 16)
    shutil.copy(Path(skimage.data.__file__).with_name("astronaut.png"), tmp_path / "img" / "a.png")
    (tmp_path / "img" / "bad.png").write_text("not an image")
    workdir = tmp_path / "run"
    argv = ["train", f"--config=configs/contrastive.py:{preset}", f"--workdir={workdir}", "--config.data.source=pairs"]
    argv += [f"--config.data.path={data}", "--config.contrastive.num_negatives=0"]
    if preset == "tiny":  # a text model, with a tokenizer that fits it
        train_tokenizer(["a cat sat on a mat"] * 8, 300, tmp_path / "tok")
        argv += ["--config.data.tokenizer=" + str(tmp_path / "tok")]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not workdir.exists()


def _mrr(model, processor, queries, documents, truth, **kw) -> float:
    """Mean reciprocal rank of each query's document (ties count against it)."""
    scores = (
        encode(model, processor, queries, **kw)
        @ encode(model, processor, documents, max_length=kw.get("max_length", 512)).T
    )
    rank = (scores >= scores[np.arange(len(queries)), truth][:, None]).sum(axis=1) - 1
    return float(np.mean(1.0 / (rank + 1)))


@pytest.mark.slow
def test_an_omni_run_learns_each_modality_with_frozen_towers(tmp_path):
    """The Omni mixture (65 % text pairs with a hard negative, 17.5 % photographs, 17.5 % speech) from a random
    tiny Omni, towers frozen: held-out retrieval rises on every modality. Held-out views: other crops and
    renderings (as above), and for text the docstrings cut at 40 % instead of the halves trained on (first part
    → the rest, at the run's 96 tokens). Margins on the mean reciprocal rank, below the gains measured (here, and
    on two other seeds outside the test harness) with room for the sampling noise of the held-out sets (about 0.01
    over 128 texts, 0.04 over 48 clips of 8 sentences): text +0.14 here (+0.07 at least), image +0.34 (+0.30),
    audio +0.10 (+0.08; a frozen random AuT passes little of a clip, so audio learns slowest)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")
    from bidirlm_jax.data.media.speech import SENTENCES, spoken_pairs
    from bidirlm_jax.data.stdlib_text import stdlib_pairs

    config = _config("tiny-omni", **{"train.steps": 300, "train.checkpoint_every": 150, "train.log_every": 10})
    train(config, str(tmp_path))
    assert np.isfinite([r["loss"] for r in metrics_of(tmp_path)]).all()
    _towers_stayed(tmp_path, (150, 300), ("visual", "audio_tower"))
    trained, fresh = bidirlm_jax.from_pretrained(tmp_path), _untrained(config)
    tokenizer = load_tokenizer(tmp_path / "model")
    images = sample_image_pairs(crops=2, seed=123)
    captions = sorted(set(CAPTIONS.values()))
    clips = spoken_pairs(variants=6, seed=123)
    datasets, instructions = stdlib_pairs(num_negatives=0)
    bodies = datasets[0].positives  # the docstring bodies
    cut = [int(0.4 * len(body)) for body in bodies]
    tasks = {  # queries, documents, truth, encode's settings for the queries
        "text": (
            [body[:c] for body, c in zip(bodies, cut)],
            [body[c:] for body, c in zip(bodies, cut)],
            np.arange(len(bodies)),
            dict(max_length=config.data.seq_len, instruction=instructions["halves"].text),
        ),
        "image": ([i for _, i in images], captions, np.asarray([captions.index(c) for c, _ in images]), {}),
        "audio": ([c for c, _ in clips], list(SENTENCES), np.repeat(np.arange(len(SENTENCES)), 6), {}),
    }
    margins = {"text": 0.05, "image": 0.15, "audio": 0.04}
    for modality, (queries, documents, truth, kw) in tasks.items():
        scores = {}
        for name, model in (("trained", trained), ("untrained", fresh)):
            con = config.contrastive
            processor = media_processor(model, tokenizer, max_pixels=con.max_pixels, max_seconds=con.max_seconds)
            scores[name] = _mrr(model, processor, queries, documents, truth, **kw)
        assert scores["trained"] >= scores["untrained"] + margins[modality], (modality, scores)


def _towers_stayed(workdir, steps, towers) -> None:
    """The frozen towers are bit-identical between two checkpoints while the text stack trained."""
    first, last = (checkpoint_tree(workdir, step) for step in steps)
    for tower in towers:
        for a, b in zip(jax.tree.leaves(first[tower]), jax.tree.leaves(last[tower]), strict=True):
            np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first["text"]), jax.tree.leaves(last["text"])))
