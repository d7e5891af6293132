"""Row-aligned media batches (`data.media.items`, `data.media.collate`) and `encode` with images and audio.

The oracle is each model's own call on the processor-style inputs of the same items (all images, or all
clips, of the batch in one array), which test_qwen3_vl_model / test_qwen3_asr_model hold against
transformers at 1e-4: a row-aligned batch must give the same hidden states, rows without media included.
The two runs differ only in how the tower's padded rows are grouped, so they agree to fp32 rounding of
the longest reductions (the text MLP's 128 terms, at the hidden states' scale).
"""

from __future__ import annotations

import json
import os
import shutil

import matplotlib
import numpy as np
import pytest
import skimage.data
from flax import nnx

import bidirlm_jax
from bidirlm_jax.audio_tokens import chunk_bucket
from bidirlm_jax.cli import main
from bidirlm_jax.data.media.collate import collate, patch_bucket
from bidirlm_jax.data.media.items import media_processor
from bidirlm_jax.embed.encode import encode, encode_texts
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.encoder import hidden_states, role_inputs
from bidirlm_jax.testing import media
from bidirlm_jax.testing import qwen3_asr as asr_ref
from bidirlm_jax.testing import qwen3_vl as vl_ref
from bidirlm_jax.testing.tolerance import fp32_tol

IMAGES = os.path.dirname(skimage.data.__file__)
GRACE_HOPPER = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
SMALL = dict(min_pixels=32 * 32, max_pixels=96 * 96)  # tiny grids (at most 6 × 6 patches) for the tiny tower
TOL = fp32_tol(128 * 8)  # regrouped 128-term sums through a few layers, relative to the largest value


def image(name: str) -> str:
    return os.path.join(IMAGES, name)


def clip(seconds: float, rate: int = 16000, seed: int = 0) -> dict:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.05, t.shape)
    return {"array": (0.3 * np.sin(2 * np.pi * 220 * (seed + 1) * t) + noise).astype(np.float32), "sampling_rate": rate}


@pytest.fixture(scope="module")
def tokenizer():
    return media.media_tokenizer()


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory, tokenizer):
    """A bidirectional tiny Qwen3-VL with its tokenizer and a small pixel budget in preprocessor_config.json."""
    path = tmp_path_factory.mktemp("vl")
    vl_ref.qwen3_vl_model(vl_ref.qwen3_vl_config(causal=False, deepstack=(0, 1, 3))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    size = {"shortest_edge": SMALL["min_pixels"], "longest_edge": SMALL["max_pixels"]}
    (path / "preprocessor_config.json").write_text(json.dumps({"size": size, "image_mean": [0.5] * 3}))
    return path


@pytest.fixture(scope="module")
def vl(vl_dir):
    return bidirlm_jax.from_pretrained(vl_dir)


@pytest.fixture(scope="module")
def asr(tmp_path_factory):
    path = tmp_path_factory.mktemp("asr")
    asr_ref.build_asr_model(asr_ref.asr_config()).save_pretrained(path)
    return bidirlm_jax.from_pretrained(path, attention="bidirectional")


# Compiled once per model and batch shape: run op by op, each of the model's few hundred operations was
# compiled on its own (most of these tests' time).
_batch_hidden = nnx.jit(hidden_states)
_processor_hidden = nnx.jit(lambda model, kwargs: model.hidden_states(**kwargs))


def _close(ours, theirs, mask):
    valid = np.asarray(mask).astype(bool)
    ours, theirs = np.asarray(ours)[valid], np.asarray(theirs)[valid]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL * np.abs(theirs).max())


VL_ITEMS = [
    {"image": image("astronaut.png"), "text": "an astronaut"},  # square
    "a cat sitting on a chair",  # text only: no image in this row
    {"image": GRACE_HOPPER},  # portrait, image only
    {"image": image("coffee.png"), "text": "a cup of coffee on a saucer"},  # landscape
]


def test_image_rows_equal_the_model_on_processor_inputs(vl, tokenizer):
    processor = media_processor(vl, tokenizer, **SMALL)
    rendered = [processor.render(item, 64) for item in VL_ITEMS]
    assert len({r.grid for r in rendered if r.grid}) == 3  # three grid shapes, one row without an image
    batch = collate(rendered, processor, rows=4, max_length=64)
    assert batch["pixel_values"].shape[:2] == (4, 64) and batch["positions"].shape == (4, 3, 32)
    ours = _batch_hidden(vl, batch)
    with_images = [r for r in rendered if r.grid]
    theirs = _processor_hidden(  # the model's call (`vl(...)`) without its LM head: prepare, then hidden_states
        vl,
        vl.prepare(
            batch["input_ids"],
            batch["attention_mask"],
            pixel_values=np.concatenate([r.patches for r in with_images]),
            image_grid_thw=np.asarray([r.grid for r in with_images]),
        ),
    )
    _close(ours, theirs, batch["attention_mask"])


def test_the_chat_template_wraps_media_before_text(vl, tokenizer):
    processor = media_processor(vl, tokenizer, **SMALL)
    ids = processor.render({"image": image("astronaut.png"), "text": "a cat"}, 64).ids
    expected = tokenizer(
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 9 + "<|vision_end|>a cat<|im_end|>\n",
        add_special_tokens=False,
    )["input_ids"]
    assert ids == expected
    plain = media_processor(vl, tokenizer, template="plain", **SMALL).render("a cat", 64).ids
    assert plain == tokenizer("a cat")["input_ids"]


def test_audio_rows_equal_the_model_on_processor_inputs(asr, tokenizer):
    processor = media_processor(asr, tokenizer)
    items = [
        {"audio": clip(1.37), "text": "a low tone"},  # one chunk and a tail
        "no clip in this row",
        {"audio": clip(2.5, rate=22050, seed=1)},  # resampled to 16 kHz
    ]
    rendered = [processor.render(item, 96) for item in items]
    batch = collate(rendered, processor, rows=4, max_length=96)
    assert batch["input_features"].shape == (4, 128, 300) and batch["audio_lengths"].tolist() == [137, 0, 250, 137]
    ours = _batch_hidden(asr, batch)
    clips = [r.features for r in rendered if r.features is not None] + [rendered[0].features]
    frames = max(f.shape[1] for f in clips)
    features = np.stack([np.pad(f, ((0, 0), (0, frames - f.shape[1]))) for f in clips])
    mask = np.arange(frames)[None] < np.asarray([f.shape[1] for f in clips])[:, None]
    theirs = _processor_hidden(
        asr, asr.prepare(batch["input_ids"], batch["attention_mask"], input_features=features, input_features_mask=mask)
    )
    _close(ours, theirs, batch["attention_mask"])


def test_clip_and_patch_buckets_hold_the_need_with_at_most_half_more():
    assert [chunk_bucket(c) for c in (1, 2, 3, 5, 9, 30)] == [1, 2, 3, 6, 12, 32]
    for need in range(1, 400):
        assert need <= chunk_bucket(need) <= 1.5 * need
        assert need <= patch_bucket(need) <= (1.5 * need if need > 64 else 2 * max(need, 8))
    assert len({chunk_bucket(c) for c in range(1, 31)}) == 10  # clips up to 30 s (100-frame chunks): ten shapes


def test_media_keys_travel_with_their_role():
    batch = {"query_input_ids": np.zeros((2, 4)), "positive_pixel_values": np.zeros((2, 8, 3))}
    batch["positive_vision_lengths"] = np.zeros((2, 1))
    assert set(role_inputs(batch, "positive")) == {"pixel_values", "vision_lengths"}


def test_encode_items_pools_each_row_in_input_order(vl, tokenizer):
    processor = media_processor(vl, tokenizer, **SMALL)
    got = encode(vl, processor, VL_ITEMS, batch_size=2, pooling="mean")
    assert got.shape == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    for i, item in enumerate(VL_ITEMS):  # each alone, its own batch of one row
        alone = encode(vl, processor, [item])[0]
        np.testing.assert_allclose(got[i], alone, atol=TOL)
    assert not np.allclose(got[0], got[2], atol=1e-3)


TEXTS = ["a cat", "two horses run across the wide green field near the old stone farm house", "x", "a red cup"]


@pytest.mark.parametrize("kind", ["vl", "asr"])
def test_text_items_of_a_tower_model_are_packed_to_the_same_embeddings(kind, vl, asr, tokenizer, monkeypatch):
    """String items skip the towers: several per row through the text stack (segment ids, per-text positions),
    equal to one per row with M-RoPE positions (Qwen3-VL) or text positions (Qwen3-ASR); media items unchanged."""
    import bidirlm_jax.embed.encode as encode_module

    model, media_item = (vl, {"image": image("astronaut.png")}) if kind == "vl" else (asr, {"audio": clip(1.3)})
    processor = media_processor(model, tokenizer, **(SMALL if kind == "vl" else {}))
    items = [TEXTS[0], media_item, *TEXTS[1:]]
    packed_rows = []
    spy = encode_module.packed_batches
    monkeypatch.setattr(
        encode_module, "packed_batches", lambda ids, **kw: packed_rows.append(len(ids)) or spy(ids, **kw)
    )
    packed = encode(model, processor, items, batch_size=4)
    assert packed_rows == [len(TEXTS)]  # every string item, and only those, went through the packed path
    padded = encode(model, processor, items, batch_size=4, pack=False)
    np.testing.assert_allclose(packed, padded, atol=TOL)


def test_the_instruction_goes_on_text_items_only(vl, tokenizer):
    processor = media_processor(vl, tokenizer, **SMALL)
    items = ["a cat", {"image": image("astronaut.png")}]
    plain, instructed = (encode(vl, processor, items, instruction=i) for i in (None, "find the image"))
    assert not np.allclose(plain[0], instructed[0], atol=1e-3)
    np.testing.assert_allclose(plain[1], instructed[1], atol=TOL)


def test_encode_counts_resized_images(vl, tokenizer):
    processor = media_processor(vl, tokenizer, **SMALL)
    result = encode_texts(vl, processor, [{"image": image("astronaut.png")}, {"image": image("page.png")}])
    assert result.num_downscaled == 2 and result.num_truncated == 0


@pytest.mark.parametrize(
    "item, message",
    [
        ({"image": "missing.png"}, r"item 0: image file not found: missing\.png"),
        ({"audio": clip(1.0)}, "item 0: holds audio but the model has no audio tower"),
        ({"picture": "x.png"}, r"item 0: an item's fields are \('text', 'image', 'audio'\)"),
        (3, "item 0 is a int, not a string or a"),
    ],
)
def test_bad_items_are_named(vl, tokenizer, item, message):
    with pytest.raises(ConfigError, match=message):
        encode(vl, media_processor(vl, tokenizer, **SMALL), [item])


def test_a_text_model_refuses_media_items(tokenizer):
    text_model = bidirlm_jax.Transformer(bidirlm_jax.get_preset("tiny-qwen3"), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="holds media but the model has no vision or audio tower"):
        encode(text_model, tokenizer, [{"image": image("astronaut.png")}])


def test_media_longer_than_max_length_is_refused(vl, tokenizer):
    processor = media_processor(vl, tokenizer, **SMALL)
    with pytest.raises(ConfigError, match="its template and media take 16 tokens, more than max_length 8"):
        processor.render({"image": image("astronaut.png")}, 8)


def test_embed_reads_image_lines_relative_to_the_file(vl, vl_dir, tokenizer, tmp_path, capsys):
    (tmp_path / "img").mkdir()
    shutil.copy(image("astronaut.png"), tmp_path / "img" / "a.png")
    lines = [{"image": "img/a.png", "text": "an astronaut"}, {"text": "a cat"}, {"image": "img/a.png"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.npy"
    assert main(["embed", "--model", str(vl_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(out)]) == 0
    assert "embedded 3 items (64 dimensions); 2 images scaled down" in capsys.readouterr().out
    items = [{"image": image("astronaut.png"), "text": "an astronaut"}, "a cat", {"image": image("astronaut.png")}]
    np.testing.assert_allclose(np.load(out), encode(vl, media_processor(vl, tokenizer, **SMALL), items), atol=TOL)


def test_embed_names_the_line_of_a_missing_image(vl_dir, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"text": "a cat"}\n{"image": "nowhere.png"}\n')
    out = tmp_path / "out.npy"
    assert main(["embed", "--model", str(vl_dir), "--input", str(tmp_path / "in.jsonl"), "--output", str(out)]) == 2
    assert "in.jsonl:2: image file not found" in capsys.readouterr().err and not out.exists()
