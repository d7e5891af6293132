"""Clip–transcript pairs a machine can make offline: espeak-ng speaking known sentences (LibriSpeech-like
speech ↔ exact transcript), for the tiny audio presets, the demo and the tests.

Each sentence is spoken in several variants (speed × pitch of one voice, deterministic in the seed); the query is
the clip, the positive its transcript. A held-out set (another seed) holds other variants of the same
sentences, so a tiny encoder can show it learned to match an unseen rendering to its words. espeak-ng is a
system package (`apt-get install espeak-ng`; `.ci/run` installs it); without it this says so.
"""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import soundfile

from bidirlm_jax.errors import ConfigError

SENTENCES = (  # eight sentences of different lengths and sounds
    "the cat sat on the mat",
    "a rocket stands on the launch pad",
    "please pass me a cup of coffee",
    "the moon is bright tonight",
    "open the window and let the cold air in",
    "she reads a book by the fire",
    "two horses run across the field",
    "turn left at the next corner",
)


def speak(text: str, *, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> dict:
    """`{"array", "sampling_rate"}` of espeak-ng saying `text`."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise ConfigError(
            "espeak-ng is not installed, and the offline speech data needs it: apt-get install espeak-ng "
            "(brew install espeak-ng on macOS)"
        )
    wav = subprocess.run(
        [binary, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text], capture_output=True, check=True
    ).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return {"array": samples, "sampling_rate": rate}


def spoken_pairs(
    variants: int = 6, *, seed: int = 0, sentences: tuple[str, ...] = SENTENCES, voice: str = "en-us"
) -> list[tuple[dict, str]]:
    """`({"audio": clip}, transcript)` for `variants` renderings of each sentence, sentence after sentence."""
    rng = np.random.default_rng(seed)
    pairs = []
    for text in sentences:
        for _ in range(variants):
            clip = speak(text, voice=voice, speed=int(rng.integers(140, 190)), pitch=int(rng.integers(35, 65)))
            pairs.append(({"audio": clip}, text))
    return pairs
