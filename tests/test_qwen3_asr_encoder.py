"""The AuT audio encoder against transformers' `Qwen3OmniMoeAudioEncoder` called one clip at a time (tiny
random configs, fp32): the conv stem at chunk boundaries, one layer, the whole encoder over a batch of
clips of different lengths in both attention modes and both chunk sizes, scanned = unrolled, token
counts against transformers' formula, and the config reader and weight table's refusals.

Tolerance: the issue's bar, 1e-5 of the output's scale. The longest fp32 reduction is `conv_out`'s
channels × frequency = 8·16 = 128 terms, whose regrouping bound is fp32_tol(128) ≈ 1.5e-5 relative in the
worst case (~√128·eps ≈ 1.3e-6 typically); what we measure is ≈ 2e-7, and every bug this file guards
against (a missing re-mask, a wrong window, a transposed weight) moves outputs by ≥ 1e-2.
"""

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from bidirlm_jax.audio_tokens import chunk_ids, chunk_tokens, conv_len, release_tokens  # noqa: E402
from bidirlm_jax.errors import CheckpointError, ConfigError  # noqa: E402
from bidirlm_jax.io.hf_config_audio import audio_config_from_hf  # noqa: E402
from bidirlm_jax.io.weights.audio import load_audio_tower  # noqa: E402
from bidirlm_jax.models.runtime import Runtime  # noqa: E402
from bidirlm_jax.models.towers.qwen3_asr.encoder import AudioEncoder, AudioLayer, token_mask  # noqa: E402
from bidirlm_jax.models.towers.qwen3_asr.stem import chunk_lengths  # noqa: E402
from bidirlm_jax.testing import qwen3_asr as ref  # noqa: E402

REL = 1e-5  # of the output's scale; see the module docstring
LENGTHS = (37, 50, 63, 99, 100, 137, 200, 250)  # single chunks short/exact, several chunks with a short tail


def _close(ours, theirs, rel=REL):
    theirs = np.asarray(theirs)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=rel * np.abs(theirs).max())


@pytest.fixture(scope="module", params=[50, 100], ids=["n_window50", "n_window100"])
def oracle(request):
    n = request.param
    config = ref.omni_audio_config(n_window=n, n_window_infer=200)  # windows of 26 / 25 tokens: 250 frames span 2
    encoder = ref.build_encoder(config)
    rng = np.random.default_rng(n)
    features = rng.standard_normal((len(LENGTHS), 128, max(LENGTHS))).astype(np.float32)
    return encoder, ref.tower_tensors(encoder), features


_run = nnx.jit(lambda model, features, lengths, chunks=None: model(features, lengths, chunks))


def _ours(oracle, audio_attention: str | None = None, **run) -> AudioEncoder:
    encoder, tensors, _ = oracle
    config = audio_config_from_hf(encoder.config.to_dict(), audio_attention=audio_attention)
    model = AudioEncoder(config, Runtime(**run), rngs=nnx.Rngs(0))
    load_audio_tower(model, tensors)
    return model


@pytest.mark.parametrize("skip", [False, True], ids=["every_chunk", "chunks_with_frames"])
@pytest.mark.parametrize("attention", ["window", "clip"])
def test_encoder_matches_transformers_per_clip(oracle, attention, skip):
    """A padded batch of eight clips in one call = transformers on each clip alone, in both modes; with the
    host's `chunk_ids` the stem skips the chunks past each clip's end (the short clips' rows hold several)."""
    encoder, _, features = oracle
    model = _ours(oracle, audio_attention=attention)
    chunks = chunk_ids(LENGTHS, features.shape[2], model.config.chunk_frames) if skip else None
    out = _run(model, features, np.asarray(LENGTHS), chunks)
    tokens, valid = np.asarray(out.tokens), np.asarray(out.valid)
    for i, length in enumerate(LENGTHS):
        expected = ref.reference_tokens(encoder, features[i, :, :length], attention)
        assert valid[i].sum() == len(expected) == chunk_tokens(length, encoder.config.n_window)
        assert valid[i, : len(expected)].all()  # the real tokens are a prefix of the row
        _close(tokens[i, : len(expected)], expected)


def test_attention_modes_differ_past_a_window(oracle):
    """250 frames span two windows of 200 frames: the two modes give different tokens there, and the same
    on a clip inside one window (99 frames, 13 tokens) — so the tests above tell them apart."""
    _, _, features = oracle
    rows = features[[LENGTHS.index(99), LENGTHS.index(250)]]
    out = {a: _run(_ours(oracle, audio_attention=a), rows, np.array([99, 250])).tokens for a in ("window", "clip")}
    _close(out["window"][0, :13], out["clip"][0, :13], rel=1e-6)
    assert np.abs(np.asarray(out["window"][1, :10] - out["clip"][1, :10])).max() > 1e-3


@pytest.mark.parametrize("length", [37, 50, 63, 99, 100])
def test_stem_single_chunk_boundary(length):
    """One chunk shorter than 2·n_window: our padded, re-masked stem = torch's convolutions on the
    unpadded chunk, while the padded chunk without re-masking differs (the boundary effect is there)."""
    encoder = ref.build_encoder(ref.omni_audio_config(n_window=50))
    model = AudioEncoder(audio_config_from_hf(encoder.config.to_dict()), rngs=nnx.Rngs(0))
    load_audio_tower(model, ref.tower_tensors(encoder))
    x = np.random.default_rng(length).standard_normal((128, length)).astype(np.float32)

    def torch_stem(features):
        h = torch.from_numpy(features)[None, None]
        with torch.no_grad():
            for conv in (encoder.conv2d1, encoder.conv2d2, encoder.conv2d3):
                h = torch.nn.functional.gelu(conv(h))
            b, c, f, t = h.shape
            h = encoder.conv_out(h.permute(0, 3, 1, 2).reshape(b, t, c * f))
            return (h + encoder.positional_embedding.positional_embedding[:t]).numpy()[0]

    expected = torch_stem(x)
    padded = np.pad(x, ((0, 0), (0, 100 - length)))[None]
    ours = np.asarray(model.stem(padded, np.array([length])))[0, : conv_len(length)]
    _close(ours, expected)
    unmasked = np.asarray(model.stem(padded, np.array([100])))[0, : conv_len(length)]
    if length < 63:  # past 63 frames the last stage's receptive field no longer reaches the padding
        assert np.abs(unmasked - expected).max() > 1e-3


def test_one_layer_matches_transformers(oracle):
    encoder, _, _ = oracle
    model = _ours(oracle, audio_attention="clip")
    x = np.random.default_rng(1).standard_normal((1, 21, 32)).astype(np.float32)
    with torch.no_grad():
        expected = encoder.layers[0](torch.from_numpy(x[0]), torch.tensor([0, 21], dtype=torch.int32))[0].numpy()
    from bidirlm_jax.kernels.attention import attend
    from bidirlm_jax.kernels.masks import MaskSpec, Segments

    segments = Segments.of(None, None, (1, 21))
    scale = model.config.head_dim**-0.5
    ours = model.layers[0](x, lambda q, k, v: attend(q, k, v, MaskSpec(None, None), segments, scale=scale))
    assert isinstance(model.layers[0], AudioLayer)
    _close(ours[0], expected)


def test_scanned_equals_unrolled(oracle):
    """One scanned layer over stacked weights computes what the unrolled layers compute."""
    _, _, features = oracle
    lengths = np.asarray(LENGTHS)
    unrolled = _run(_ours(oracle), features, lengths).tokens
    scanned_model = _ours(oracle, scan_layers=True)
    assert scanned_model.layers.fc1.shape[0] == 2  # stacked on a leading layers axis
    # The scan regroups each layer's fp32 sums (≤ 128-wide), ~fp32_tol(128) of values of order 1.
    _close(_run(scanned_model, features, lengths).tokens, unrolled, rel=2e-5)


def test_chunk_ids_name_the_chunks_that_hold_frames():
    """Rows of 250 frames, chunks of 100 (3 per row, flat ids row·3 + k); the count padded to a `chunk_bucket`
    with the out-of-range id 3·rows, and never past every chunk."""
    assert chunk_ids([250, 0, 37], 250, 100).tolist() == [0, 1, 2, 6]  # clip 1 has no frame, clip 2 one chunk
    assert chunk_ids([250, 37, 37], 250, 100).tolist() == [0, 1, 2, 3, 6, 9]  # 5 ids -> 6
    assert chunk_ids([250, 250, 250], 250, 100).tolist() == list(range(9))  # 9 -> 12, capped at the 9 there are
    assert chunk_ids([0, 0], 300, 100).tolist() == [6]  # no clip: one padding id, a static shape all the same


def test_token_counts_every_length():
    """The tower's per-chunk count = transformers' formula for every length 1..3000 (n_window 50); with
    n_window 100 transformers' formula (13 per full chunk) is wrong and ours counts what the stem makes;
    the release's whole-clip count agrees with it only there (chunks of 200 frames are multiples of 8)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    lengths = np.arange(1, 3001)
    for n in (50, 100):
        frames = chunk_lengths(jax.numpy.asarray(lengths), -(-3000 // (2 * n)), 2 * n)
        counted = np.asarray(token_mask(frames, conv_len(2 * n))).sum(1)
        np.testing.assert_array_equal(counted, chunk_tokens(lengths, n))
        # the stem makes ceil(chunk / 8) tokens per chunk: count them independently
        np.testing.assert_array_equal(counted, [sum(-(-m // 8) for m in _chunks(L, 2 * n)) for L in lengths])
        theirs = _get_feat_extract_output_lengths(torch.from_numpy(lengths), n).numpy()
        if n == 50:
            np.testing.assert_array_equal(counted, theirs)
            assert (release_tokens(lengths) != counted).any() and release_tokens(250) == 32 < counted[249] == 33
        else:
            assert theirs[199] == 13 and counted[199] == 25
            np.testing.assert_array_equal(release_tokens(lengths), counted)


def _chunks(length: int, n: int) -> list[int]:
    return [n] * (length // n) + ([length % n] if length % n else [])


def test_config_reader():
    from transformers import Qwen3ASRConfig

    whole = Qwen3ASRConfig(audio_config=dict(model_type="qwen3_asr_encoder", d_model=32, encoder_layers=2,
                                             encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64)).to_dict()  # fmt: skip
    config = audio_config_from_hf(whole)
    assert (config.n_window, config.n_window_infer, config.audio_attention) == (50, 800, "window")
    assert config.window_tokens == 13 * 8
    release = dict(whole["audio_config"], model_type="bidirlm_omni_audio", n_window=100, n_window_infer=400)
    assert audio_config_from_hf({"audio_config": release}).audio_attention == "clip"
    assert audio_config_from_hf({"thinker_config": {"audio_config": release}}).chunk_tokens == 25
    with pytest.raises(ConfigError, match="n_window"):
        audio_config_from_hf({k: v for k, v in whole["audio_config"].items() if k != "n_window"})
    with pytest.raises(ConfigError, match="no audio encoder"):
        audio_config_from_hf({"model_type": "qwen3", "hidden_size": 64})
    with pytest.raises(ConfigError, match="n_window_infer"):
        audio_config_from_hf(dict(release, n_window_infer=300))


def test_weight_table_refusals(oracle):
    _, tensors, _ = oracle
    model = AudioEncoder(_ours(oracle).config, rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="missing"):
        load_audio_tower(model, {k: v for k, v in tensors.items() if "layers.1.fc2" not in k})
    with pytest.raises(CheckpointError, match="shapes disagree"):
        load_audio_tower(model, {**tensors, "audio_tower.proj2.weight": np.zeros((3, 3), np.float32)})
    load_audio_tower(model, {"thinker." + k: v for k, v in tensors.items()}, prefix="thinker.audio_tower.")


def test_every_cpu_kernel_computes_the_same():
    """The window segments (ids and padding) run on the kernels `attend` picks on CPU (blocked) and
    everywhere else as the fallback (chunked), a row with no clip (a batch bucket's padding) included;
    real tokens agree with the reference kernel."""
    encoder = ref.build_encoder(ref.omni_audio_config(n_window=50, n_window_infer=200))
    features = np.random.default_rng(3).standard_normal((3, 128, 250)).astype(np.float32)
    lengths = np.array([250, 37, 0])
    outputs = {}
    for impl in ("reference", "blocked", "chunked"):
        config = audio_config_from_hf(encoder.config.to_dict())
        model = AudioEncoder(config, Runtime(attention_impl=impl), rngs=nnx.Rngs(0))
        load_audio_tower(model, ref.tower_tensors(encoder))
        out = _run(model, features, lengths)
        outputs[impl] = np.asarray(out.tokens)[np.asarray(out.valid)]
        assert np.isfinite(np.asarray(out.tokens)).all()
    assert len(outputs["reference"]) == 33 + 5
    for tokens in outputs.values():
        _close(tokens, outputs["reference"])  # kernels regroup the same fp32 sums


def test_hidden_states_match_qwen3_asr_encoder():
    """`hidden_states` (before the projector) = transformers' -hf `Qwen3ASREncoder.last_hidden_state` on
    clips of several chunks, whose tails both zero-pad (the -hf encoder always pads single chunks too,
    which the release does not: those are the per-clip tests' business)."""
    from transformers import Qwen3ASREncoder, Qwen3ASREncoderConfig

    encoder = ref.build_encoder(ref.omni_audio_config(n_window=50))  # -hf keeps 13 positions: n_window 50
    tensors = ref.tower_tensors(encoder)
    fields = ("num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "d_model",
              "downsample_hidden_size", "output_dim", "n_window", "n_window_infer")  # fmt: skip
    hf = Qwen3ASREncoder(Qwen3ASREncoderConfig(**{f: getattr(encoder.config, f) for f in fields})).eval()
    hf.config._attn_implementation = "eager"
    outside = ("audio_tower.proj1", "audio_tower.proj2")  # the -hf projector is not the encoder's
    hf.load_state_dict({k.removeprefix("audio_tower."): torch.from_numpy(v) for k, v in tensors.items()
                        if not k.startswith(outside)})  # fmt: skip
    lengths = np.array([137, 250])
    mask = np.arange(300)[None, :] < lengths[:, None]  # padded to whole chunks, as -hf requires
    padded = np.random.default_rng(4).standard_normal((2, 128, 300)).astype(np.float32) * mask[:, None, :]
    with torch.no_grad():
        expected = hf(torch.from_numpy(padded), torch.from_numpy(mask.astype(np.int64))).last_hidden_state.numpy()
    model = AudioEncoder(audio_config_from_hf(encoder.config.to_dict()), rngs=nnx.Rngs(0))
    load_audio_tower(model, tensors)
    hidden, valid = nnx.jit(lambda m, x, n: m.hidden_states(x, n))(model, padded, lengths)
    _close(np.asarray(hidden)[np.asarray(valid)], expected)


def test_sharded_equals_one_device(oracle):
    """On a data × fsdp × tensor mesh (parameters placed by their logical axes, clips split over data ×
    fsdp) the tower computes what it computes on one device."""
    from bidirlm_jax import sharding

    _, _, features = oracle
    model = _ours(oracle, scan_layers=True)
    lengths = np.asarray(LENGTHS)
    expected = _run(model, features, lengths).tokens
    mesh = sharding.make_mesh(2, 2, 2)
    placed = sharding.place(model, mesh)
    assert placed.layers.self_attn.q_proj[...].sharding.spec == sharding.logical_to_spec(
        ("layers", "heads", "head_dim", "embed"), placed.layers.self_attn.q_proj.shape, mesh
    )
    with jax.set_mesh(mesh):
        batch = (
            jax.device_put(features, sharding.batch_sharding(mesh, 3)),
            jax.device_put(lengths, sharding.batch_sharding(mesh, 1)),
        )
        tokens = _run(placed, *batch).tokens
    # sharded contractions regroup the same fp32 sums (≤ 128 terms), as scanned vs unrolled
    _close(tokens, expected, rel=2e-5)
