"""Audio in for the audio tower: decoding (.wav, .flac, arrays), resampling to 16 kHz, the maximum duration,
log-mel features equal to transformers' `WhisperFeatureExtractor(feature_size=128)` per clip, placeholder
counts, and clear errors for bad inputs.

Tolerances. Our STFT runs in float64 like the extractor's numpy path, so the two differ by its float32
roundings of log10 P and of (log10 P + 4)/4: 2 ULPs of the terms, |x − 1| + 1 (`_rounding`). The extractor's default path (torch installed) runs `torch.stft` in fp32,
and resampling rounds too; a relative amplitude error ρ of the clip's loudest bin moves a bin 10^-k
below it (in power) by 2ρ·10^(k/2) relatively, which is 2ρ·10^(2(x_max − x)) / (4 ln 10) in the
features' units x = (log10 P + 4)/4 (`_log_tol`): tight on loud bins, loose near the 80 dB floor.
"""

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from bidirlm_jax.data.media.audio import (
    HOP,
    N_FFT,
    SAMPLING_RATE,
    audio_features,
    batch_features,
    load_audio,
    log_mel,
    mel_filters,
    placeholder_count,
)
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.testing.tolerance import EPS32, ulps

transformers = pytest.importorskip("transformers")

SOXR_HQ = 2.0**-20  # soxr's "HQ" quality: 20-bit precision
EDGE = 3  # frames at each end where the resampler's filter (a few ms) sees past the clip


def _signal(rate: int, seconds: float = 1.37, noise: float = 0.01) -> np.ndarray:
    """A tone and a chirp (below 4 kHz, so an 8 kHz file holds them too), plus white noise of std `noise`."""
    t = np.arange(int(seconds * rate)) / rate
    noise = noise * np.random.default_rng(rate).standard_normal(len(t))
    return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (300 + 1200 * t) * t) + noise).astype(
        np.float32
    )


def _log_tol(reference: np.ndarray, rho: float) -> np.ndarray:
    """Per feature, what a relative amplitude error `rho` of the loudest bin can move it (module docstring)."""
    return 2 * rho * 10.0 ** (2 * (reference.max() - reference)) / (4 * math.log(10)) + _rounding(reference)


def _rounding(reference: np.ndarray) -> np.ndarray:
    """2 ULPs of the terms of x = (log10 P + 4)/4 (module docstring)."""
    return ulps(np.abs(reference - 1) + 1, 2)


@pytest.fixture(scope="module")
def whisper():
    return transformers.WhisperFeatureExtractor(feature_size=128)


def _whisper(extractor, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The extractor's default (fp32 torch) and numpy (float64) features of one clip."""
    default = extractor(samples, sampling_rate=SAMPLING_RATE, padding="longest", truncation=False,
                        return_tensors="np").input_features[0]  # fmt: skip
    return default, extractor._np_extract_fbank_features(samples[None], "cpu")[0]


def test_mel_filters_equal_whisper(whisper):
    np.testing.assert_allclose(mel_filters(), whisper.mel_filters, rtol=1e-12, atol=0)


@pytest.mark.parametrize("suffix,subtype", [(".wav", "FLOAT"), (".flac", "PCM_16")])
def test_features_equal_whisper(tmp_path, whisper, suffix, subtype):
    """A file decoded and featurised = the extractor on the same decoded samples; ⌊samples/160⌋ frames."""
    path = tmp_path / f"clip{suffix}"
    soundfile.write(path, _signal(SAMPLING_RATE), SAMPLING_RATE, subtype=subtype)
    decoded, _ = soundfile.read(path, dtype="float32")
    ours = audio_features(path)
    assert ours.truncated == 0
    assert ours.features.shape == (128, len(decoded) // HOP) == (128, 137)
    default, numpy_path = _whisper(whisper, decoded)
    assert np.all(np.abs(ours.features - numpy_path) <= _rounding(numpy_path))
    assert np.all(np.abs(ours.features - default) <= _log_tol(default, EPS32 * math.log2(N_FFT)))


@pytest.mark.parametrize("rate", [8000, 44100])
def test_resampled_file(tmp_path, whisper, rate):
    """A file at another rate is resampled to 16 kHz before its features: equal to the extractor on the
    soxr-resampled samples, and, inside the clip, to the same signal made at 16 kHz (within soxr's precision)."""
    path = tmp_path / f"clip_{rate}.wav"
    soundfile.write(path, _signal(rate, noise=0), rate, subtype="FLOAT")  # noise would differ between rates
    ours = audio_features(path).features
    resampled = soxr.resample(soundfile.read(path, dtype="float32")[0], rate, SAMPLING_RATE).astype(np.float32)
    assert ours.shape == (128, len(resampled) // HOP) == (128, 137)
    _, numpy_path = _whisper(whisper, resampled)
    assert np.all(np.abs(ours - numpy_path) <= _rounding(numpy_path))
    direct = log_mel(_signal(SAMPLING_RATE, noise=0))[:, EDGE:-EDGE]
    assert np.all(np.abs(ours[:, EDGE:-EDGE] - direct) <= _log_tol(direct, SOXR_HQ))


def test_recorded_stereo_file(whisper):
    """A real recording (CPython's test data: a plucked string, stereo, 11,025 Hz, 32-bit PCM): averaged
    to mono, resampled, then the extractor's features of those samples."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "test" / "audiodata" / "pluck-pcm32.wav"
    if not path.is_file():
        pytest.skip(f"{path} is not installed with this Python")
    decoded, rate = soundfile.read(path, dtype="float32")
    assert decoded.shape[1] == 2 and rate == 11025
    mono = soxr.resample(decoded.mean(axis=1), rate, SAMPLING_RATE).astype(np.float32)
    ours = audio_features(path).features
    assert ours.shape == (128, len(mono) // HOP)
    assert np.all(np.abs(ours - _whisper(whisper, mono)[1]) <= _rounding(ours))


def test_arrays_channels_and_maximum_duration():
    """Arrays take the same path; channels are averaged; a clip past the maximum is cut and counted."""
    x = _signal(SAMPLING_RATE, 2.0)
    stereo = np.stack([x, np.zeros_like(x)], axis=1)
    np.testing.assert_array_equal(load_audio({"array": stereo, "sampling_rate": 16000}).samples, x / 2)
    clip = load_audio({"array": x, "sampling_rate": 16000}, max_seconds=1.5)
    assert (len(clip.samples), clip.truncated) == (24000, 8000)
    long = np.tile(x, 16)  # 32 s
    out = audio_features({"array": long, "sampling_rate": 16000})  # default maximum: 30 s, as mteb
    assert out.features.shape == (128, 3000) and out.truncated == 2 * SAMPLING_RATE


def test_placeholder_counts():
    """Our models take every token the tower makes; the release's count keeps fewer and says how many."""
    assert placeholder_count(250, 50) == (33, 0)
    assert placeholder_count(250, 50, formula="release") == (32, 1)
    assert placeholder_count(3000, 50, formula="release") == (375, 15)  # 30 s: 15 features beyond the release's
    assert placeholder_count(250, 100, formula="release") == placeholder_count(250, 100) == (32, 0)
    with pytest.raises(ConfigError, match="formula"):
        placeholder_count(250, 50, formula="whole")


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    junk = tmp_path / "notes.wav"
    junk.write_text("not audio")
    with pytest.raises(ConfigError, match="cannot decode"):
        load_audio(junk)
    x = _signal(SAMPLING_RATE)
    for rate in (0, -16000, "16k", None, True):
        with pytest.raises(ConfigError, match="cannot be resampled"):
            load_audio({"array": x, "sampling_rate": rate})
    with pytest.raises(ConfigError, match="sampling_rate"):
        load_audio({"array": x})
    with pytest.raises(ConfigError, match="finite"):
        load_audio({"array": np.full(1000, np.nan), "sampling_rate": 16000})
    with pytest.raises(ConfigError, match="too short"):
        audio_features({"array": x[:150], "sampling_rate": 16000})
    with pytest.raises(ConfigError, match="file path or"):
        load_audio(123)
    with pytest.raises(ConfigError, match="max_seconds"):
        load_audio({"array": x, "sampling_rate": 16000}, max_seconds=0)
    with pytest.raises(ConfigError, match="samples, channels"):
        load_audio({"array": np.zeros((2, 3, 4)), "sampling_rate": 16000})


def test_batch_features():
    clips = [np.ones((128, 137), np.float32), np.full((128, 250), 2, np.float32)]
    batch, lengths = batch_features(clips, multiple=100)
    assert batch.shape == (2, 128, 300) and lengths.tolist() == [137, 250]
    assert (batch[0, :, :137] == 1).all() and (batch[0, :, 137:] == 0).all() and (batch[1, :, 250:] == 0).all()
    assert batch_features(clips, multiple=100, frames=400)[0].shape == (2, 128, 400)
    for frames in (200, 350):
        with pytest.raises(ConfigError, match="use 300 or more"):
            batch_features(clips, multiple=100, frames=frames)
    with pytest.raises(ConfigError, match="no audio"):
        batch_features([], multiple=100)


def test_files_to_tower_tokens(tmp_path):
    """Files → our features → one padded batch → our tower = the extractor on each clip → transformers'
    encoder on each clip (the whole host-and-device path against the reference pipeline)."""
    pytest.importorskip("torch")
    from flax import nnx

    from bidirlm_jax.io.hf_config_audio import audio_config_from_hf
    from bidirlm_jax.io.weights.audio import load_audio_tower
    from bidirlm_jax.models.towers.qwen3_asr.encoder import AudioEncoder
    from bidirlm_jax.testing import qwen3_asr as ref

    paths = []
    for seconds, rate in ((0.6, 16000), (2.3, 44100)):
        paths.append(tmp_path / f"{seconds}.wav")
        soundfile.write(paths[-1], _signal(rate, seconds), rate, subtype="FLOAT")
    encoder = ref.build_encoder(ref.omni_audio_config())
    model = AudioEncoder(audio_config_from_hf(encoder.config.to_dict()), rngs=nnx.Rngs(0))
    load_audio_tower(model, ref.tower_tensors(encoder))
    batch, lengths = batch_features([audio_features(p).features for p in paths], multiple=100)
    out = nnx.jit(lambda m, x, n: m(x, n))(model, batch, lengths)
    extractor = transformers.WhisperFeatureExtractor(feature_size=128)
    for i, path in enumerate(paths):
        features = _whisper(extractor, load_audio(path).samples)[1]  # its float64 path: ours within 2 ULPs
        expected = ref.reference_tokens(encoder, features, "window")
        ours = np.asarray(out.tokens[i])[np.asarray(out.valid[i])]
        # the tower's bar (tests/test_qwen3_asr_encoder.py): 1e-5 of the output's scale
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
