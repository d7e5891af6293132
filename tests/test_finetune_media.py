"""Fine-tuning with images and audio (`configs/finetune.py:tiny-image`, `:tiny-audio`, §6's specialists in
miniature): the runs learn, the frozen tower stays bit-identical, the classifier's logits on a media batch are
its head on the encoder's hidden states of that batch, media records read from .jsonl paths and parquet
cells alike, and bad media data is refused before anything is written.

"Learns" is judged on the training split (photographs / questions with both labels, so the text alone is at
chance): the trained classifier against the same architecture at its random init. On 64 balanced examples a
classifier that learnt nothing scores 0.5 ± 0.0625 (binomial), so the margin of 0.25 is four standard
deviations. (SIGKILL and restart of an audio run: test_objectives_resume.)
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
import soundfile
from flax import nnx

from bidirlm_jax.cli import main
from bidirlm_jax.configs.finetune import get_config
from bidirlm_jax.data.labeled import Fields, LabelMap, read_split
from bidirlm_jax.data.labeled_media import encode_labeled, generated_split
from bidirlm_jax.data.media.collate import collate
from bidirlm_jax.data.media.items import media_processor
from bidirlm_jax.data.media.samples import sample_image
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.evals.finetune import evaluate
from bidirlm_jax.evals.registry import EVALUATORS
from bidirlm_jax.io.heads import export_finetuned, load_finetuned
from bidirlm_jax.io.tokenizer import load_tokenizer, pad_id, train_tokenizer
from bidirlm_jax.models.encoder import hidden_states
from bidirlm_jax.models.heads import EncoderWithHead, HeadConfig
from bidirlm_jax.models.towers.omni.model import Omni
from bidirlm_jax.models.towers.presets import get_tower_preset
from bidirlm_jax.testing import media
from bidirlm_jax.train.loop import train
from bidirlm_jax.train.objectives.media import run_processor
from tests.runs import checkpoint_tree, metrics_of

QUIET = {"metrics.progress_bar": False, "metrics.tensorboard": False}
ESPEAK = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng; .ci/run does)"
)


def _config(preset: str):
    c = get_config(preset)
    for key, value in QUIET.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def _run(preset: str, tmp_path_factory):
    config, workdir = _config(preset), tmp_path_factory.mktemp(preset)
    train(config, str(workdir), evaluators=EVALUATORS)
    return config, workdir


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    return _run("tiny-image", tmp_path_factory)


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    return _run("tiny-audio", tmp_path_factory)


def _learnt(config, workdir) -> None:
    """The trained classifier against its random init on the training split (see the module doc)."""
    trained, description = load_finetuned(workdir, step="latest")
    fresh = EncoderWithHead(
        trained.config,
        trained.head_config,
        trained.runtime,
        rngs=nnx.Rngs(config.train.seed),
        encoder=type(trained.encoder),
    )
    tokenizer = load_tokenizer(workdir / "model")
    processor = run_processor(config, config.finetune, trained.config, tokenizer)
    split = generated_split(
        config.data.source, "classification", config.finetune.synthetic_train_size, seed=config.data.seed, name="train"
    )
    label_map = LabelMap("classification", tuple(description["labels"]))
    scores = {
        name: evaluate(
            model, tokenizer, split, label_map=label_map, max_length=config.data.seq_len, processor=processor
        )
        for name, model in (("trained", trained), ("untrained", fresh))
    }
    assert scores["trained"]["accuracy"] >= scores["untrained"]["accuracy"] + 0.25, scores
    assert scores["trained"]["loss"] < scores["untrained"]["loss"], scores
    last = metrics_of(workdir)[-1]  # the held-out split (other crops / renderings) was scored at the end
    assert last["eval/examples"] == config.finetune.synthetic_validation_size and 0 <= last["eval/accuracy"] <= 1


def _tower_stayed(workdir, steps, tower) -> None:
    first, last = (checkpoint_tree(workdir, step)["encoder"] for step in steps)
    for a, b in zip(jax.tree.leaves(first[tower]), jax.tree.leaves(last[tower]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first["text"]), jax.tree.leaves(last["text"])))


@pytest.mark.slow
def test_an_image_text_classifier_learns_and_keeps_its_frozen_tower(image_run):
    config, workdir = image_run
    _learnt(config, workdir)
    _tower_stayed(workdir, (config.train.steps // 2, config.train.steps), "visual")
    assert json.loads((workdir / "model" / "preprocessor_config.json").read_text())["size"]["longest_edge"] == 128 * 128
    with pytest.raises(ConfigError, match="towers; no transformers class"):
        export_finetuned(workdir, workdir / "export")
    assert not (workdir / "export").exists()


@ESPEAK
@pytest.mark.slow
def test_an_audio_text_classifier_learns_and_keeps_its_frozen_tower(audio_run):
    config, workdir = audio_run
    _learnt(config, workdir)
    _tower_stayed(workdir, (config.train.steps // 2, config.train.steps), "audio_tower")


def test_logits_are_the_head_on_the_encoders_hidden_states_of_a_media_batch():
    head = HeadConfig("classification", 3, pooling="mean")  # the head is the text path's (every pooling: test_heads)
    model = EncoderWithHead(get_tower_preset("tiny-omni"), head, rngs=nnx.Rngs(0), encoder=Omni)
    processor = media_processor(model.encoder, media.media_tokenizer(), max_pixels=64 * 64, max_seconds=2.0)
    tone = {"array": np.sin(np.arange(12_000) * 0.05).astype(np.float32), "sampling_rate": 16_000}
    cat = sample_image("chelsea.png")
    items = [
        {"image": cat, "text": "a cat"},
        {"audio": tone, "text": "a tone"},
        "text alone",
        {"image": cat, "audio": tone},
    ]
    batch = collate([processor.render(item, 64) for item in items], processor, rows=4, max_length=64)
    assert {"positions", "pixel_values", "input_features"} <= set(batch)
    both = nnx.jit(lambda m, b: (m(**b).logits, m.head(hidden_states(m.encoder, b), b)))  # one compile, not eager
    logits, expected = both(model, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_array_equal(logits, expected)
    assert logits.shape == (4, 3) and np.isfinite(logits).all()


def _png(path: Path) -> bytes:
    shutil.copy(Path(skimage.data.__file__).with_name("coffee.png"), path)
    return path.read_bytes()


def test_media_records_read_from_jsonl_paths_and_parquet_cells_alike(tmp_path):
    (tmp_path / "img").mkdir()
    data = _png(tmp_path / "img" / "coffee.png")
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"image": "img/coffee.png", "text": "a cup", "label": "yes"}) + "\n"
    )
    table = {"image": [{"bytes": data, "path": None}], "text": ["a cup"], "label": ["yes"]}
    pq.write_table(pa.table(table), tmp_path / "train.parquet")
    vl = get_tower_preset("tiny-qwen3-vl")
    processor = media_processor(vl, media.media_tokenizer(), max_pixels=64 * 64)
    rows = []
    for name in ("train.jsonl", "train.parquet"):
        split = read_split(tmp_path / name, "classification")
        assert split.media_kinds == ("image",) and split.texts == ["a cup"]
        encoded = encode_labeled(
            split, None, LabelMap("classification", ("no", "yes")), max_length=48, processor=processor
        )
        rows.append(encoded.row(0, 48, pad_id(processor.tokenizer)))
    for key in rows[0]:
        np.testing.assert_array_equal(rows[0][key], rows[1][key], err_msg=key)
    assert rows[0]["labels"] == 1 and rows[0]["pixel_values"].shape[0] == processor.vision.max_patches
    text = read_split(tmp_path / "train.jsonl", "classification", fields=Fields(image=""))  # media fields switched off
    assert text.media is None


def _wav(path: Path) -> None:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(8000, np.float32), 16_000, format="WAV")
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize(
    "preset, record, settings, message",
    [
        (
            "tiny",
            {"image": "img/a.png", "text": "a cup", "label": 1},
            [],
            r"holds image, but the run trains a text model",
        ),
        (
            "tiny-image",
            {"audio": "img/a.wav", "text": "a cup", "label": 1},
            [],
            r"holds audio but the model has no audio",
        ),
        ("tiny-image", {"image": "cup.png", "text": "a cup", "label": 1}, [], r"train\.jsonl:1: image file not found"),
        ("tiny-image", {"image": "img/bad.png", "text": "a cup", "label": 1}, [], r"train\.jsonl:\d+: cannot decode"),
        (
            "tiny-image",
            {"image": "img/a.png", "text": "a cup", "pair": "b", "label": 1},
            ["--config.finetune.text_pair_field=pair"],
            r"train\.jsonl:1: a media example is one item",
        ),
    ],
)
def test_bad_media_data_is_refused_before_anything_is_written(tmp_path, capsys, preset, record, settings, message):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png")
    _wav(tmp_path / "img" / "a.wav")
    (tmp_path / "img" / "bad.png").write_text("not an image")
    records = [{**record, "label": i % 2} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if preset == "tiny":  # a text model, with a tokenizer that fits it
        train_tokenizer(["a cup of coffee"] * 8, 300, tmp_path / "tok")
    else:
        media.media_tokenizer().save_pretrained(tmp_path / "tok")
    workdir = tmp_path / "run"
    argv = ["train", f"--config=configs/finetune.py:{preset}", f"--workdir={workdir}", "--config.data.source=labeled"]
    argv += [f"--config.data.path={tmp_path / 'train.jsonl'}", f"--config.data.tokenizer={tmp_path / 'tok'}"]
    argv += [f"--config.evals.validation.data={tmp_path / 'train.jsonl'}", *settings]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not workdir.exists()


def test_a_specialist_preset_without_its_checkpoint_is_refused(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = [
        "train",
        "--config=configs/finetune.py:boolq-audio",
        f"--workdir={workdir}",
        "--config.data.global_batch_size=16",
    ]
    assert main(argv) == 2
    assert "model.towers=true trains a model with vision/audio towers" in capsys.readouterr().err
    assert not workdir.exists()


def test_hub_image_and_audio_cells_are_read_undecoded_and_rendered(monkeypatch):
    """boolq-audio's shape: a `datasets` Audio column (and an Image one) beside the text and a boolean label."""
    import datasets

    from bidirlm_jax.data import labeled

    wav = io.BytesIO()
    soundfile.write(wav, np.sin(np.arange(8000) * 0.05).astype(np.float32), 16_000, format="WAV")
    png = io.BytesIO()
    sample_image("coffee.png").save(png, format="PNG")
    table = {"image": [{"bytes": png.getvalue(), "path": None}], "audio": [{"bytes": wav.getvalue(), "path": None}]}
    rows = datasets.Dataset.from_dict({**table, "passage": ["a cup"], "answer": [True]})
    rows = rows.cast_column("image", datasets.Image()).cast_column("audio", datasets.Audio())
    monkeypatch.setattr(labeled, "hub_dataset", lambda spec, split: rows)
    split = read_split("hf:someone/boolq-like", "classification", fields=Fields(text="passage", label="answer"))
    assert split.media_kinds == ("image", "audio") and split.labels == ["True"]
    processor = media_processor(
        get_tower_preset("tiny-omni"), media.media_tokenizer(), max_pixels=64 * 64, max_seconds=1.0
    )
    encoded = encode_labeled(
        split, None, LabelMap("classification", ("False", "True")), max_length=64, processor=processor
    )
    row = encoded.row(0, 64, 0)
    assert row["labels"] == 1 and row["audio_lengths"] == 8000 // 160 and row["vision_lengths"].sum() > 0
