"""The Omni model against transformers-built oracles (tiny, random, fp32, bidirectional, padded batches):
`Qwen3VLModel` (`is_causal: false`) for text+image, `Qwen3OmniMoeAudioEncoder` per clip with whole-clip
attention scattered into the same text stack for audio, and both for rows holding audio and images.

Tolerance: the project's 1e-4 relative to the largest reference value on valid tokens. The towers' own
errors (~1e-6 vision, ~2e-7 audio, their tests) feed three text layers whose longest fp32 reductions are
128-term MLP and ≤ 48-token attention sums; a misplaced audio or image token, a wrong position or a
DeepStack addition at audio positions moves the hidden states by 1e-2 or more.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

import bidirlm_jax  # noqa: E402
from bidirlm_jax import sharding  # noqa: E402
from bidirlm_jax.errors import CheckpointError, ConfigError  # noqa: E402
from bidirlm_jax.io.hf_config import read_runtime  # noqa: E402
from bidirlm_jax.models.towers.omni.model import Omni  # noqa: E402
from bidirlm_jax.models.towers.qwen3_vl.layout import vision_layout  # noqa: E402
from bidirlm_jax.models.towers.qwen3_vl.rope_index import get_rope_index  # noqa: E402
from bidirlm_jax.models.transformer import Transformer  # noqa: E402
from bidirlm_jax.testing import omni as ref  # noqa: E402

REL_TOL = 1e-4  # see the module docstring
T = 48
GRIDS = [(1, 4, 6), (1, 2, 4)]  # 6 and 2 image tokens
CLIPS = [137, 60]  # 18 tokens (two chunks) and 8 (one chunk), n_window 50


def _rows(audio: bool = True, images: bool = True) -> list[list[int]]:
    """Four rows: audio then an image amid text, an image alone, a clip alone, text alone."""
    a = [ref.audio_run(n) if audio else [] for n in CLIPS]
    i = [ref.image_run(g) if images else [] for g in GRIDS]
    return [
        [5, 6, *a[0], 7, *i[0], 8, 9],  # right padding
        [*range(10, 20), *i[1], 21],  # left padding
        [22, *a[1], *range(23, 30)],  # right padding
        [*range(30, 30 + T)],  # text, full
    ]


def batch(audio: bool = True, images: bool = True) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = np.zeros((4, T), np.int64), np.zeros((4, T), np.int64)
    for b, row in enumerate(_rows(audio, images)):
        at = slice(T - len(row), T) if b == 1 else slice(0, len(row))
        ids[b, at], mask[b, at] = row, 1
    return ids, mask


def pixels() -> np.ndarray:
    n = sum(t * h * w for t, h, w in GRIDS)
    return np.random.default_rng(0).uniform(-1, 1, (n, 1536)).astype(np.float32)


def clips() -> tuple[np.ndarray, np.ndarray]:
    frames = np.arange(max(CLIPS))[None, :] < np.array(CLIPS)[:, None]
    features = np.random.default_rng(1).standard_normal((2, 128, max(CLIPS))).astype(np.float32) * frames[:, None]
    return features, frames.astype(np.int64)


def media(audio: bool = True, images: bool = True) -> dict:
    kw = {}
    if images:
        kw.update(pixel_values=pixels(), image_grid_thw=np.array(GRIDS))
    if audio:
        features, frames = clips()
        kw.update(input_features=features, input_features_mask=frames)
    return kw


def oracle(hf, audio: bool = True, images: bool = True) -> np.ndarray:
    vl, encoder = hf
    ids, mask = batch(audio, images)
    kw = {}
    if images:
        kw.update(pixel_values=pixels(), grids=GRIDS)
    if audio:
        features, frames = clips()
        kw.update(features=features, frames=frames.sum(-1))
    return ref.reference(vl, encoder, ids, mask, **kw)


@pytest.fixture(scope="module")
def hf():
    return ref.vl_model(), ref.audio_encoder()


@pytest.fixture(scope="module")
def release_dir(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("omni") / "release"
    ref.save_release(*hf, path)
    return path


@pytest.fixture(scope="module")
def model(release_dir):
    return bidirlm_jax.from_pretrained(release_dir)


def _close(ours, theirs, mask):
    valid = np.asarray(mask).astype(bool)
    ours, theirs = np.asarray(ours, np.float64)[valid], np.asarray(theirs, np.float64)[valid]
    assert np.abs(ours - theirs).max() <= REL_TOL * np.abs(theirs).max()


def test_loads_the_release_layout(model):
    assert isinstance(model, Omni) and model.visual is not None and model.audio_tower is not None
    config = model.config
    assert config.audio.n_window == 50 and config.audio.audio_attention == "clip"
    assert config.vision.deepstack_visual_indexes == ref.DEEPSTACK and config.vision.taps == ((0, 0), (1, 1))
    assert config.text.mrope_section == (6, 5, 5) and config.text.rope_full.theta == 5e6
    assert model.runtime.attention == "bidirectional" and len(model.visual.deepstack_mergers) == 3


@pytest.mark.parametrize("audio,images", [(True, True), (False, True), (True, False)], ids=["all", "image", "audio"])
def test_matches_the_oracles(hf, model, audio, images):
    ids, mask = batch(audio, images)
    out = model(ids, mask, **media(audio, images))
    _close(out.hidden_states, oracle(hf, audio, images), mask)
    assert out.logits.shape == (4, T, 1024)


def test_text_image_is_transformers_qwen3vl(hf, model):
    """Without audio the oracle is `Qwen3VLModel` itself, called with input ids and its own positions."""
    vl, _ = hf
    ids, mask = batch(audio=False)
    with torch.no_grad():
        theirs = vl(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            pixel_values=torch.as_tensor(pixels()),
            image_grid_thw=torch.as_tensor(GRIDS),
            mm_token_type_ids=torch.as_tensor((ids == ref.IMAGE).astype(np.int64)),
        ).last_hidden_state
    _close(model(ids, mask, **media(audio=False)).hidden_states, theirs.numpy(), mask)


def test_text_only_is_the_text_model(release_dir, model, hf):
    ids, mask = batch(audio=False, images=False)
    text = bidirlm_jax.from_pretrained(release_dir, vision=False, audio=False)
    assert isinstance(text, Transformer)
    ours = model(ids, mask).hidden_states
    np.testing.assert_array_equal(np.asarray(ours)[mask == 1], np.asarray(text(ids, mask).hidden_states)[mask == 1])
    _close(ours, oracle(hf, audio=False, images=False), mask)


def test_media_change_the_result(model):
    """The comparisons above can fail: the clips' and the images' tokens are what the text layers see."""
    ids, mask = batch()
    full = np.asarray(model(ids, mask, **media()).hidden_states)
    placeholders_only = np.asarray(model.text.hidden_states(ids, mask))
    assert np.abs(full[0, 2] - placeholders_only[0, 2]).max() > 1e-2  # an audio token
    assert np.abs(full[1, -5] - placeholders_only[1, -5]).max() > 1e-2  # an image token


def test_scanned_equals_unrolled(release_dir, model):
    ids, mask = batch()
    scanned = bidirlm_jax.from_pretrained(release_dir, runtime=read_runtime(release_dir, scan_layers=True))
    inputs = model.prepare(ids, mask, **media())
    run = nnx.jit(lambda m, kw: m.hidden_states(**kw))
    # The same operations regrouped by other fusions (fp32 rounding only): far inside the parity bar.
    _close(run(scanned, inputs), run(model, inputs), mask)


def row_aligned(ids, mask) -> dict[str, np.ndarray]:
    """The encoder's media batch of the same four rows: each row's image patches and clip in its own row."""
    features, frames = clips()
    per_row_grids = [[GRIDS[0]], [GRIDS[1]], [], []]
    layout = vision_layout(per_row_grids, 24, merge=2, side=4)
    pix = np.zeros((4, 24, 1536), np.float32)
    pix[0, :24], pix[1, :8] = pixels()[:24], pixels()[24:]
    feats = np.zeros((4, 128, max(CLIPS)), np.float32)
    feats[0], feats[2] = features
    positions, _ = get_rope_index(ids, GRIDS, mask, image_token_id=ref.IMAGE, spatial_merge_size=2)
    return dict(
        input_ids=ids.astype(np.int32),
        attention_mask=mask.astype(np.int32),
        positions=positions.transpose(1, 0, 2).astype(np.int32),
        pixel_values=pix,
        vision_coords=layout.coords,
        vision_interp_index=layout.interp_index,
        vision_interp_weight=layout.interp_weight,
        vision_lengths=layout.lengths,
        input_features=feats,
        audio_lengths=np.array([CLIPS[0], 0, CLIPS[1], 0], np.int32),
    )


def test_batch_hidden_states_of_row_aligned_media(hf, model):
    ids, mask = batch()
    got = nnx.jit(lambda m, x: m.batch_hidden_states(x))(model, row_aligned(ids, mask))
    _close(got, oracle(hf), mask)


def test_sharded_on_8_devices_equals_one(model):
    ids, mask = batch()
    inputs = model.prepare(ids, mask, **media())
    run = nnx.jit(lambda m, kw: m.hidden_states(**kw))
    expected = run(model, inputs)
    mesh = sharding.make_mesh(2, 2, 2)
    placed = sharding.place(model, mesh)
    with jax.set_mesh(mesh):
        got = run(placed, inputs)
    _close(got, expected, mask)  # sharded contractions regroup fp32 sums only


def test_loading_without_a_tower(release_dir):
    ids, mask = batch(audio=False)
    no_audio = bidirlm_jax.from_pretrained(release_dir, audio=False)
    assert no_audio.audio_tower is None and no_audio.config.audio is None and no_audio.visual is not None
    no_audio(ids, mask, **media(audio=False))  # images still run
    with pytest.raises(ConfigError, match="without its audio tower"):
        no_audio(*batch(), **media())
    no_vision = bidirlm_jax.from_pretrained(release_dir, vision=False)
    assert no_vision.visual is None and no_vision.audio_tower is not None
    with pytest.raises(ConfigError, match="without its vision tower"):
        no_vision(ids, mask, **media(audio=False))


def test_a_tower_the_weights_lack(hf, tmp_path):
    vl, encoder = hf
    path = tmp_path / "no_audio"
    ref.save_release(vl, encoder, path)
    from safetensors.numpy import load_file, save_file

    tensors = {k: v for k, v in load_file(path / "model.safetensors").items() if not k.startswith("audio_tower.")}
    save_file(tensors, path / "model.safetensors")
    assert bidirlm_jax.from_pretrained(path).audio_tower is None  # the config describes it, the weights lack it
    with pytest.raises(CheckpointError, match="no audio tower"):
        bidirlm_jax.from_pretrained(path, audio=True)


def test_bad_inputs_are_refused(model):
    ids, mask = batch()
    short = ids.copy()
    short[0, 3] = 5  # one audio placeholder fewer than the clips' 26 tokens
    with pytest.raises(ConfigError, match="25 audio placeholders"):
        model(short, mask, **media())
    with pytest.raises(ConfigError, match="image placeholders"):
        model(ids, mask, **{**media(), "pixel_values": pixels()[:24], "image_grid_thw": np.array(GRIDS[:1])})


def test_the_release_placeholder_count_keeps_each_clip_s_first_tokens(hf, model, caplog):
    """BidirLM-Omni's processor counts a clip's placeholders by the whole-clip formula: 32 for 250 frames
    where the tower makes 33 (n_window 50); the release's `masked_scatter` then keeps the clip's first 32.
    Given such inputs the model does the same, and says how many tokens it dropped."""
    frames = 250
    row = [5, *ref.audio_run(frames, release=True), 6, 7]
    assert row.count(ref.AUDIO_PAD) == 32
    ids, mask = np.asarray([row]), np.ones((1, len(row)), np.int64)
    features = np.random.default_rng(2).standard_normal((1, 128, frames)).astype(np.float32)
    with caplog.at_level("WARNING"):
        ours = model(ids, mask, input_features=features, input_features_mask=np.ones((1, frames), bool))
    assert "1 of 33 tokens dropped" in caplog.text
    theirs = ref.reference(*hf, ids, mask, features=features, frames=[frames], keep=[32])
    _close(ours.hidden_states, theirs, mask)


@pytest.mark.parametrize("placeholders", ["chunks", "release"])
def test_the_media_data_path_equals_the_processor_style_call(model, placeholders):
    """Items of every combination rendered (chat template, audio before the image; a clip of 250 frames,
    whose two placeholder counts differ) and collated into one row-aligned batch (`data.media`), through
    `models.encoder.hidden_states`: the model's own call on the processor-style inputs of the same items
    gives the same hidden states (only the towers' padded rows are grouped differently: fp32 regrouping)."""
    import os

    import skimage.data

    from bidirlm_jax.data.media.collate import collate
    from bidirlm_jax.data.media.items import media_processor
    from bidirlm_jax.models.encoder import hidden_states
    from bidirlm_jax.testing import media

    t = np.arange(40000) / 16000  # 250 mel frames: 33 tokens, 32 by the release's count
    speech = {"array": (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), "sampling_rate": 16000}
    astronaut = os.path.join(os.path.dirname(skimage.data.__file__), "astronaut.png")
    items = [
        {"audio": speech, "image": astronaut, "text": "an astronaut, described"},
        {"image": astronaut},
        {"audio": speech, "text": "a tone"},
        "text alone",
    ]
    processor = media_processor(
        model, media.media_tokenizer(), min_pixels=32 * 32, max_pixels=64 * 64, audio_placeholders=placeholders
    )
    rendered = [processor.render(item, 96) for item in items]
    assert [r.ids.count(ref.AUDIO_PAD) for r in rendered] == [33 - (placeholders == "release"), 0] * 2
    assert [r.audio_dropped for r in rendered if r.features is not None] == [placeholders == "release"] * 2
    batch = collate(rendered, processor, rows=4, max_length=96)
    ours = nnx.jit(hidden_states)(model, batch)
    clips = [r.features for r in rendered if r.features is not None]
    frames = max(f.shape[1] for f in clips)
    theirs = model(
        batch["input_ids"],
        batch["attention_mask"],
        pixel_values=np.concatenate([r.patches for r in rendered if r.grid]),
        image_grid_thw=np.asarray([r.grid for r in rendered if r.grid]),
        input_features=np.stack([np.pad(f, ((0, 0), (0, frames - f.shape[1]))) for f in clips]),
        input_features_mask=np.arange(frames)[None] < np.asarray([f.shape[1] for f in clips])[:, None],
    ).hidden_states
    _close(ours, theirs, batch["attention_mask"])
