"""Audio in: decode (.wav/.flac with soundfile, or arrays), mono, 16 kHz (soxr), a maximum duration, and
the 128-bin log-mel features of transformers' `WhisperFeatureExtractor(feature_size=128)`.

Features are computed one clip at a time: in a padded batch transformers' STFT reflects a short clip's
last frame into the zero padding and its log-mel floor follows the batch's loudest clip, so a clip's
features would depend on its neighbours. The STFT runs in float64 (the reference's fp32 STFT agrees
within its own rounding). A clip gives ⌊samples/160⌋ frames (the STFT's last frame is dropped).

Placeholder counts (`placeholder_count`) come from `bidirlm_jax.audio_tokens`: the tower's per-chunk
count for our models, or BidirLM-Omni's whole-clip count when reproducing the release, which keeps
fewer tokens than the tower makes; the difference is returned, never silently dropped.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from bidirlm_jax.audio_tokens import chunk_tokens, release_tokens
from bidirlm_jax.errors import ConfigError

SAMPLING_RATE = 16000
N_FFT = 400  # 25 ms Hann window
HOP = 160  # 10 ms: one mel frame
MEL_BINS = 128
MAX_SECONDS = 30.0  # mteb's cap on audio inputs
LOG_FLOOR = 8.0  # log10 units below the clip's loudest bin that are kept (80 dB)
FORMULAS = ("chunks", "release")


class Clip(NamedTuple):
    """Mono float32 samples at 16 kHz and the samples cut beyond the maximum duration."""

    samples: np.ndarray
    truncated: int  # samples dropped at 16 kHz (0 when the clip fit)


class PlaceholderCount(NamedTuple):
    tokens: int  # audio placeholders to put in the prompt
    dropped: int  # features the tower makes beyond them (only with the release's formula)


def load_audio(item: Any, *, max_seconds: float = MAX_SECONDS) -> Clip:
    """A clip from a path (.wav, .flac, anything libsndfile reads), encoded bytes or `{"array", "sampling_rate"}`:
    channels averaged, resampled to 16 kHz with soxr, cut to `max_seconds` (counted in `truncated`)."""
    if max_seconds <= 0:
        raise ConfigError(f"max_seconds must be positive, got {max_seconds}")
    if isinstance(item, (str, os.PathLike, bytes)):
        where = "audio bytes" if isinstance(item, bytes) else os.fspath(item)
        samples, rate = _decode(item if isinstance(item, bytes) else where)
    elif isinstance(item, Mapping) and "array" in item:
        if "sampling_rate" not in item:
            raise ConfigError('an audio array needs its "sampling_rate" (e.g. {"array": x, "sampling_rate": 16000})')
        samples, rate, where = np.asarray(item["array"]), item["sampling_rate"], "audio array"
    else:
        raise ConfigError(f'audio must be a file path or {{"array", "sampling_rate"}}, got {type(item).__name__}')
    samples = _mono(samples, where)
    samples = _resample(samples, rate, where)
    limit = int(round(max_seconds * SAMPLING_RATE))
    return Clip(samples[:limit], max(0, len(samples) - limit))


def _decode(source: str | bytes) -> tuple[np.ndarray, int]:
    import soundfile

    if isinstance(source, str) and not os.path.isfile(source):
        raise ConfigError(f"audio file {source} does not exist")
    name = "audio bytes" if isinstance(source, bytes) else f"audio file {source}"
    try:
        samples, rate = soundfile.read(
            io.BytesIO(source) if isinstance(source, bytes) else source, dtype="float32", always_2d=True
        )
    except Exception as e:  # libsndfile's errors are RuntimeError/LibsndfileError with its own message
        raise ConfigError(f"cannot decode {name} ({e}); give a .wav or .flac file") from e
    return samples, rate


def _mono(samples: np.ndarray, where: str) -> np.ndarray:
    if samples.ndim == 2:  # [samples, channels], soundfile's layout
        samples = samples.mean(axis=1)
    if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.number):
        raise ConfigError(f"{where}: audio must be [samples] or [samples, channels] numbers, got {samples.shape}")
    samples = samples.astype(np.float32)
    if not np.all(np.isfinite(samples)):
        raise ConfigError(f"{where}: audio samples must be finite (found NaN or inf)")
    return samples


def _resample(samples: np.ndarray, rate: Any, where: str) -> np.ndarray:
    import soxr

    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer, float)) or not 0 < rate < 10**7:
        raise ConfigError(f"{where}: sampling rate {rate!r} cannot be resampled; give a rate in Hz such as 16000")
    if rate == SAMPLING_RATE:
        return samples
    return soxr.resample(samples, float(rate), SAMPLING_RATE).astype(np.float32)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, np.float64)
    mel = 3.0 * hz / 200.0
    log = hz >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), 200.0 * mel / 3.0)


@functools.cache
def mel_filters(mel_bins: int = MEL_BINS) -> np.ndarray:
    """[N_FFT/2 + 1, mel_bins] triangular filters on Slaney's mel scale over 0–8 kHz, area-normalised
    (librosa's and Whisper's `norm="slaney"`)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLING_RATE / 2), mel_bins + 2))
    freqs = np.linspace(0, SAMPLING_RATE // 2, N_FFT // 2 + 1)
    slopes = edges[None, :] - freqs[:, None]
    widths = np.diff(edges)
    rising, falling = -slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def log_mel(samples: np.ndarray, mel_bins: int = MEL_BINS) -> np.ndarray:
    """[mel_bins, ⌊len/160⌋] float32 log-mel features of one 16 kHz clip (Whisper's normalisation:
    log10 power floored 8 below the clip's maximum, then (x + 4) / 4)."""
    if len(samples) <= N_FFT // 2:
        raise ConfigError(f"audio clip of {len(samples)} samples is too short: features need > {N_FFT // 2} (12.5 ms)")
    x = np.pad(np.asarray(samples, np.float64), N_FFT // 2, mode="reflect")
    frames = 1 + (len(x) - N_FFT) // HOP
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    index = np.arange(N_FFT)[None, :] + HOP * np.arange(frames - 1)[:, None]  # the last frame is dropped
    power = np.abs(np.fft.rfft(x[index] * window, axis=1)) ** 2  # [frames, N_FFT/2 + 1]
    log = np.log10(np.maximum(power @ mel_filters(mel_bins), 1e-10)).T
    log = np.maximum(log, log.max() - LOG_FLOOR)
    return ((log + 4.0) / 4.0).astype(np.float32)


class AudioFeatures(NamedTuple):
    features: np.ndarray  # [mel_bins, frames] float32
    truncated: int  # samples cut beyond the maximum duration


def audio_features(item: Any, *, max_seconds: float = MAX_SECONDS, mel_bins: int = MEL_BINS) -> AudioFeatures:
    """Decode, resample and cut one clip (`load_audio`), then its log-mel features."""
    clip = load_audio(item, max_seconds=max_seconds)
    return AudioFeatures(log_mel(clip.samples, mel_bins), clip.truncated)


def placeholder_count(frames: int, n_window: int, *, formula: str = "chunks") -> PlaceholderCount:
    """Audio placeholders for a clip of `frames` mel frames: "chunks" = every token the tower makes (our
    models), "release" = BidirLM-Omni's whole-clip count, with the tower's extra tokens in `dropped`."""
    if formula not in FORMULAS:
        raise ConfigError(f"placeholder formula {formula!r} is not one of {FORMULAS}")
    made = int(chunk_tokens(frames, n_window))
    count = made if formula == "chunks" else int(release_tokens(frames))
    return PlaceholderCount(count, made - count)


def batch_features(
    features: list[np.ndarray], *, multiple: int, frames: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Clips' features `[mel_bins, L_i]` → `[B, mel_bins, T]` zero-padded and the lengths `[B]`, T a multiple
    of `multiple` (the tower's chunk, 2·n_window): the longest clip rounded up, or `frames` (a static
    bucket, which every clip must fit)."""
    if not features:
        raise ConfigError("no audio clips to batch")
    lengths = np.array([f.shape[1] for f in features], np.int32)
    longest = -(-int(lengths.max()) // multiple) * multiple
    if frames is None:
        frames = longest
    elif frames % multiple or frames < lengths.max():
        raise ConfigError(
            f"audio bucket of {frames} frames must be a multiple of {multiple} holding the longest clip "
            f"({lengths.max()} frames); use {longest} or more"
        )
    out = np.zeros((len(features), features[0].shape[0], frames), np.float32)
    for row, f in zip(out, features):
        row[:, : f.shape[1]] = f
    return out, lengths
