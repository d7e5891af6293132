"""The MTEB adapter with images and audio (issue 22): our collation (PIL and array inputs, soxr to 16 kHz,
`datasets.Audio` read without torchcodec), the released protocol (composed inputs = the sum of their parts'
embeddings) against the joint one, and offline any-to-any retrieval tasks built from scikit-image photographs
and espeak-ng clips whose mteb scores equal `bidirlm eval` on the same local directory, for text→image,
text→image+text and text→audio. One tiny random BidirLM-Omni (both towers) serves every test."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
from PIL import Image

mteb = pytest.importorskip("mteb")

from datasets import Audio, Dataset  # noqa: E402

from bidirlm_jax.data.media.images import to_rgb  # noqa: E402
from bidirlm_jax.data.media.samples import CAPTIONS, sample_image  # noqa: E402
from bidirlm_jax.embed.compose import encode_items  # noqa: E402
from bidirlm_jax.embed.encode import encode  # noqa: E402
from bidirlm_jax.errors import ConfigError  # noqa: E402
from bidirlm_jax.evals.mteb import MTEBEncoder, beir_task, run_mteb  # noqa: E402
from bidirlm_jax.evals.mteb_collate import MediaCollator, media_loader  # noqa: E402
from bidirlm_jax.testing import omni as ref  # noqa: E402
from tests.encoders import make_encoder_src, run_cli  # noqa: E402

INSTRUCTION = "Find the picture or the recording described"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "horse.png", "moon.png")
SPOKEN = ("the cat sat on the mat", "two horses run across the field", "turn left at the next corner")


def needs_espeak():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("omni-mteb") / "release"
    ref.release_dir(path)
    return path


@pytest.fixture(scope="module")
def adapter(omni_dir):
    return MTEBEncoder.from_pretrained(omni_dir, batch_size=4)


def write_beir(root: Path, docs: list[tuple[dict, str]]) -> Path:
    """A BEIR directory: document i (its line's fields) is the one relevant document of query i (a caption)."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", **d}) + "\n" for i, (d, _) in enumerate(docs))
    )
    queries = "".join(json.dumps({"_id": f"q{i}", "text": caption}) + "\n" for i, (_, caption) in enumerate(docs))
    (root / "queries.jsonl").write_text(queries)
    qrels = "".join(f"q{i}\td{i}\t1\n" for i in range(len(docs)))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return root


@pytest.fixture(scope="module")
def beir_dirs(tmp_path_factory):
    """Local any-to-any directories: photographs (alone, or with a short title) ↔ captions, clips ↔ transcripts."""
    root = tmp_path_factory.mktemp("media-beir")
    (root / "files").mkdir()
    for name in PHOTOS:
        sample_image(name).save(root / "files" / Path(name).with_suffix(".png").name)
    photos = [({"image": f"../files/{Path(n).stem}.png"}, CAPTIONS[n]) for n in PHOTOS]
    dirs = {
        "t2i": write_beir(root / "t2i", photos),
        "t2it": write_beir(root / "t2it", [({**d, "text": f"photo {i}"}, c) for i, (d, c) in enumerate(photos)]),
    }
    if shutil.which("espeak-ng"):
        from bidirlm_jax.data.media.speech import speak

        clips = []
        for i, sentence in enumerate(SPOKEN):
            clip = speak(sentence, speed=150 + 10 * i)  # 22.05 kHz: both paths resample to 16 kHz
            soundfile.write(root / "files" / f"clip{i}.wav", clip["array"], clip["sampling_rate"])
            clips.append(({"audio": f"../files/clip{i}.wav"}, sentence))
        dirs["t2a"] = write_beir(root / "t2a", clips)
    return dirs


# --- collation -------------------------------------------------------------------------------------------


def test_collator_images_and_arrays(tmp_path):
    """PIL images in any mode, arrays and image cells become RGB PIL images; clips become 16 kHz mono arrays
    resampled by soxr (16 kHz ones untouched), cut to the maximum duration; absent cells stay None."""
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 255, (20, 30), np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 255, (20, 30, 4), np.uint8), "RGBA")
    png = io.BytesIO()
    grey.save(png, format="PNG")
    at_8k = rng.standard_normal(8000).astype(np.float32) * 0.1
    stereo_44k = rng.standard_normal((2, 44100)).astype(np.float32) * 0.1  # channels first, as torch holds it
    at_16k = rng.standard_normal(16000 * 3).astype(np.float32) * 0.1
    soundfile.write(tmp_path / "c.wav", at_8k, 8000)
    rows = [
        {"id": "a", "image": grey, "audio": {"array": at_8k, "sampling_rate": 8000}},
        {"id": "b", "image": rgba, "audio": {"array": stereo_44k, "sampling_rate": 44100}},
        {
            "id": "c",
            "image": {"bytes": png.getvalue(), "path": None},
            "audio": {"bytes": None, "path": str(tmp_path / "c.wav")},
        },
        {"id": "d", "image": np.asarray(rgba), "audio": {"array": at_16k, "sampling_rate": 16000}},
        {"id": "e", "image": None, "audio": None},
    ]
    batch = MediaCollator(max_seconds=2.0)(rows)
    assert batch["id"] == ["a", "b", "c", "d", "e"] and batch["image"][4] is None and batch["audio"][4] is None
    for image, source in zip(batch["image"], (grey, rgba, grey, rgba)):
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(to_rgb(source)))
    assert all(a["sampling_rate"] == 16000 for a in batch["audio"][:4])
    expected = [
        soxr.resample(at_8k, 8000, 16000),
        soxr.resample(stereo_44k.mean(axis=0), 44100, 16000),
        soxr.resample(soundfile.read(tmp_path / "c.wav", dtype="float32")[0], 8000, 16000),
        at_16k[: 2 * 16000],  # at 16 kHz already: only cut to 2 s
    ]
    for clip, want in zip(batch["audio"], expected):
        np.testing.assert_array_equal(clip["array"], want.astype(np.float32))
    with pytest.raises(ConfigError, match="audio must be"):
        MediaCollator()([{"audio": 3}])


def test_media_loader_reads_audio_columns_without_torchcodec(tmp_path):
    """A `datasets.Audio` column (torchcodec would decode it; it is not installed) is read undecoded and
    decoded by soundfile, in mteb's order and batch size."""
    from torch.utils.data import DataLoader

    clip = np.linspace(-0.5, 0.5, 22050, dtype=np.float32)
    soundfile.write(tmp_path / "c.wav", clip, 22050)
    dataset = Dataset.from_dict({"id": ["x", "y", "z"], "audio": [str(tmp_path / "c.wav")] * 3})
    dataset = dataset.cast_column("audio", Audio())
    loader = media_loader(DataLoader(dataset, batch_size=2), MediaCollator())
    batches = list(loader)
    assert [b["id"] for b in batches] == [["x", "y"], ["z"]]
    want = soxr.resample(soundfile.read(tmp_path / "c.wav", dtype="float32")[0], 22050, 16000)
    np.testing.assert_array_equal(batches[1]["audio"][0]["array"], want)


# --- protocol --------------------------------------------------------------------------------------------


def test_released_protocol_sums_the_parts(adapter, tmp_path):
    """Composed items embed as the sum of `encode` of each part (the instruction on the text part only);
    single-part items as `encode` alone; the joint protocol reads one sequence and differs."""
    model, processor = adapter.model, adapter.tokenizer
    photo = sample_image("chelsea.png").resize((48, 40))
    clip = {"array": np.sin(np.arange(12000) / 7.0).astype(np.float32) * 0.3, "sampling_rate": 24000}
    items = ["a tabby cat", {"image": photo, "text": "a cat"}, {"audio": clip, "text": "spoken"}, {"image": photo}]
    kw = adapter.encode_kwargs  # the adapter's shapes: compiled once for the module
    summed = encode_items(model, processor, items, instruction=INSTRUCTION, **kw)
    text = encode(model, processor, ["a tabby cat", "a cat", "spoken"], instruction=INSTRUCTION, **kw)
    image = encode(model, processor, [{"image": photo}] * 2, **kw)[0]
    audio = encode(model, processor, [{"audio": clip}], **kw)[0]
    want = np.stack([text[0], text[1] + image, text[2] + audio, image])
    np.testing.assert_allclose(summed, want, atol=2e-6)
    joint = encode_items(model, processor, items, protocol="joint", instruction=INSTRUCTION, **kw)
    prompt = f"Instruct: {INSTRUCTION}\nQuery: "
    one_sequence = [prompt + items[0], {**items[1], "text": prompt + "a cat"}, {**items[2], "text": prompt + "spoken"}]
    np.testing.assert_allclose(joint, encode(model, processor, [*one_sequence, items[3]], **kw), atol=2e-6)
    np.testing.assert_allclose(joint[[0, 3]], summed[[0, 3]], atol=2e-6)  # one part: the same either way
    assert np.linalg.norm(joint[1]) == pytest.approx(1.0, abs=1e-5) and abs(np.linalg.norm(summed[1]) - 1) > 0.01
    with pytest.raises(ConfigError, match="protocol 'mean' is not one of"):
        encode_items(model, processor, items, protocol="mean")


def test_model_meta_names_modalities_and_revisions(adapter, omni_dir):
    meta = adapter.mteb_model_meta
    assert meta.modalities == ["text", "image", "audio"] and meta.embed_dim == 64 and meta.name == "bidirlm-jax/release"
    joint = MTEBEncoder.from_loaded(omni_dir, adapter.model, adapter.tokenizer, batch_size=4, protocol="joint")
    assert joint.mteb_model_meta.revision != meta.revision  # the protocol changes composed embeddings
    assert adapter.instruction(mteb.get_task("WITT2IRetrieval").metadata, mteb.types.PromptType.query) == (
        "Retrieve images based on multilingual descriptions."  # the Omni wrapper's MIEB entry
    )


# --- any-to-any tasks: mteb equals bidirlm eval ----------------------------------------------------------


@pytest.mark.parametrize(("kind", "protocol"), [("t2i", "sum"), ("t2it", "sum"), ("t2it", "joint"), ("t2a", "sum")])
def test_any_to_any_task_equals_bidirlm_eval(adapter, omni_dir, beir_dirs, kind, protocol, tmp_path):
    """mteb's pipeline (its datasets.Image/Audio columns, dataloaders, search and pytrec_eval) on a local
    any-to-any task, offline, scores what `bidirlm eval` scores on the same directory, under either protocol."""
    if kind == "t2a":
        needs_espeak()
    task = beir_task(beir_dirs[kind], instruction=INSTRUCTION)
    assert task.metadata.category == kind
    encoder = MTEBEncoder.from_loaded(omni_dir, adapter.model, adapter.tokenizer, batch_size=4, protocol=protocol)
    results = run_mteb(encoder, [task])
    scores = results["LocalBEIRRetrieval"]["scores"]["test"]["default"]
    assert encoder.prompts_used[("LocalBEIRRetrieval", "query")] == INSTRUCTION
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", omni_dir, "--beir", beir_dirs[kind], "--instruction", INSTRUCTION, "--batch-size", 4]
    assert run_cli([*argv, "--protocol", protocol, "--no-progress", "--output", out]) == 0
    ours = json.loads(out.read_text())["retrieval"][str(beir_dirs[kind])]
    assert ours["num_queries"] == ours["num_documents"] == (len(SPOKEN) if kind == "t2a" else len(PHOTOS))
    for metric in ("ndcg_at_10", "mrr_at_10", "recall_at_100"):
        assert scores[metric] == pytest.approx(ours[metric], abs=1e-5), metric  # mteb rounds to 5 digits


def test_media_beir_lines_are_checked(beir_dirs, tmp_path):
    """A line names a missing file, or holds neither text nor media: the file and line say so."""
    from bidirlm_jax.evals.retrieval import load_beir

    data = load_beir(beir_dirs["t2it"])
    assert data.modalities() == (["text"], ["text", "image"])
    assert data.document("d0") == {
        "image": str((beir_dirs["t2it"].parent / "files" / "astronaut.png").resolve()),
        "text": "photo 0",
    }
    bad = shutil.copytree(beir_dirs["t2i"], tmp_path / "bad")
    (bad / "corpus.jsonl").write_text('{"_id": "d0", "image": "nowhere.png"}\n')
    with pytest.raises(ConfigError, match=r"corpus.jsonl:1: image file .*nowhere.png does not exist"):
        load_beir(bad)
    (bad / "corpus.jsonl").write_text('{"_id": "d0", "title": "no body"}\n')
    with pytest.raises(ConfigError, match=r"corpus.jsonl:1: missing field\(s\) \['text'\]"):
        load_beir(bad)


def test_modalities_the_model_lacks_are_refused(omni_dir, beir_dirs, qwen_dir, tmp_path, monkeypatch, capsys):
    text_only = MTEBEncoder.from_pretrained(omni_dir, towers=False)
    assert text_only.mteb_model_meta.modalities == ["text"]
    with pytest.raises(
        ConfigError, match="mteb task LocalBEIRRetrieval has image inputs, and the model reads text only"
    ):
        run_mteb(text_only, [beir_task(beir_dirs["t2i"])])
    encoder = make_encoder_src(qwen_dir, tmp_path / "text-encoder")
    out = tmp_path / "eval.json"
    assert run_cli(["eval", "--model", encoder, "--beir", beir_dirs["t2i"], "--output", out]) == 2
    assert (
        f"BEIR directory {beir_dirs['t2i']} has image inputs, and the model reads text only" in capsys.readouterr().err
        and not out.exists()
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-datasets"))
    assert run_cli(["eval", "--model", omni_dir, "--mteb", "CommonVoiceMini21T2ARetrieval"]) == 2  # a MAEB task
    assert "the data of mteb task CommonVoiceMini21T2ARetrieval is not available locally" in capsys.readouterr().err
