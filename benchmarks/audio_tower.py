"""AuT audio encoder throughput (clips/s, CPU, fp32) and log-mel feature extraction: ours against transformers
on the same clips and weights.

The encoder is Qwen3-ASR-1.7B's (d_model 1024, 16 heads, ffn 4096, stem 480 channels, output 2048, chunks of
100 frames, attention windows of 800 frames) cut to `--layers` layers, random weights. transformers' side is
the -hf layout's `Qwen3ASREncoder` (`sdpa`) followed by its `Qwen3ASRMultiModalProjector`, called on the whole
padded batch; ours is `AudioEncoder` (jitted, compiled before timing) holding the same weights, "window"
attention, given the chunks that hold frames (`audio_tokens.chunk_ids`, as `Qwen3ASR.prepare` passes them:
transformers' encoder computes no chunk past a clip's end either). Clips are 2–`--max-seconds` s, every one longer than a chunk (transformers' batched call treats a
single-chunk clip differently from one alone), and the two outputs must agree to 1e-4 of their scale before
anything is timed. Features: `data.media.audio.audio_features` per clip against
`WhisperFeatureExtractor(feature_size=128)` per clip (the same features; batched, its log floor follows the
batch's loudest clip) and on the whole batch (`padding="longest"`). Last (unless `--no-stem`), the conv stem
alone on both sides, where most of the tower's time goes at this size.

    .venv/bin/python benchmarks/audio_tower.py [--clips 8] [--max-seconds 20] [--rounds 5] [--layers 4] [--no-stem]
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from measure import Bench
from transformers import Qwen3ASREncoderConfig, WhisperFeatureExtractor
from transformers.models.qwen3_asr.modeling_qwen3_asr import Qwen3ASREncoder, Qwen3ASRMultiModalProjector

from bidirlm_jax.audio_tokens import chunk_ids, chunk_tokens
from bidirlm_jax.data.media.audio import SAMPLING_RATE, audio_features, batch_features
from bidirlm_jax.io.hf_config_audio import audio_config_from_hf
from bidirlm_jax.io.weights.audio import load_audio_tower
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.towers.qwen3_asr.encoder import AudioEncoder
from bidirlm_jax.testing import qwen3_asr as ref

ASR_1_7B = dict(
    d_model=1024,
    encoder_attention_heads=16,
    encoder_ffn_dim=4096,
    downsample_hidden_size=480,
    output_dim=2048,
    n_window=50,
    n_window_infer=800,
    num_mel_bins=128,
)
OUT = Path(__file__).parent / "out" / "audio_tower.json"


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """`build_encoder`'s perturbation (weights 0.1·randn, biases 0.3·randn, norm scales 1 + 0.1·randn)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_scale = name.endswith("weight") and ("norm" in name or "ln_post" in name)
            p.copy_((1.0 if is_scale else 0.0) + (0.3 if name.endswith("bias") else 0.1) * torch.randn_like(p))
    return module.eval()


def towers(layers: int):
    """transformers' encoder and projector (random weights) and ours holding the same weights."""
    torch.manual_seed(0)
    config = Qwen3ASREncoderConfig(**ASR_1_7B, encoder_layers=layers)
    config._attn_implementation = "sdpa"
    encoder = perturbed(Qwen3ASREncoder(config))
    projector = perturbed(Qwen3ASRMultiModalProjector(types.SimpleNamespace(audio_config=config)))
    tensors = ref.tower_tensors(encoder)
    for i, linear in ((1, projector.linear_1), (2, projector.linear_2)):
        tensors |= {f"audio_tower.proj{i}.{k}": v.detach().numpy() for k, v in linear.state_dict().items()}
    ours = AudioEncoder(audio_config_from_hf(config.to_dict(), audio_attention="window"), Runtime(), rngs=nnx.Rngs(0))
    load_audio_tower(ours, tensors)
    return encoder, projector, ours


def clips(count: int, max_seconds: float) -> list[np.ndarray]:
    """`count` 16 kHz clips of 2–`max_seconds` s: a tone, a chirp and noise, each its own loudness."""
    rng = np.random.default_rng(0)
    out = []
    for seconds in np.linspace(2.0, max_seconds, count) + rng.uniform(0, 0.5, count):
        t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
        tone = np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.4 * np.sin(2 * np.pi * (300 + 900 * t) * t)
        out.append((rng.uniform(0.1, 0.8) * tone + 0.02 * rng.standard_normal(len(t))).astype(np.float32))
    return out


def time_stems(bench: Bench, encoder: Qwen3ASREncoder, ours: AudioEncoder, features: np.ndarray, rounds: int):
    """The conv stem alone (three stride-2 3×3 convolutions, GELU, `conv_out`) on every chunk of the batch,
    padded ones included, as both towers run it: where the tower's time goes."""
    n = 2 * ASR_1_7B["n_window"]
    b, mels, t = features.shape
    chunks = features.reshape(b, mels, t // n, n).transpose(0, 2, 1, 3).reshape(-1, mels, n)
    graphdef, state = nnx.split(ours.stem)
    stem = jax.jit(lambda state, mel: nnx.merge(graphdef, state)(mel, jnp.full(mel.shape[0], n, jnp.int32)))
    mel, pmel = jax.device_put(chunks), torch.from_numpy(chunks)[:, None]

    def theirs():
        with torch.no_grad():
            x = pmel
            for conv in (encoder.conv2d1, encoder.conv2d2, encoder.conv2d3):
                x = torch.nn.functional.gelu(conv(x))
            return encoder.conv_out(x.permute(0, 3, 1, 2).flatten(2))

    stem(state, mel).block_until_ready()
    print(f"conv stem alone, {len(chunks)} chunks of {n} frames:")
    bench.rounds({"ours stem": lambda: stem(state, mel).block_until_ready(), "transformers stem": theirs}, rounds)
    return bench.show_ratio("ours stem", "transformers stem")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--no-stem", dest="stem", action="store_false", help="leave out the conv stem's own timing")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    bench = Bench(threads={"torch": torch.get_num_threads()})
    audio = clips(args.clips, args.max_seconds)

    extractor = WhisperFeatureExtractor(feature_size=128)
    items = [{"array": a, "sampling_rate": SAMPLING_RATE} for a in audio]
    feats = [audio_features(item).features for item in items]
    whisper = [
        extractor(a, sampling_rate=SAMPLING_RATE, padding=False, return_tensors="np").input_features[0] for a in audio
    ]
    feature_error = max(float(np.abs(f - w[:, : f.shape[1]]).max()) for f, w in zip(feats, whisper))
    print(f"features: max |ours - whisper| = {feature_error:.2e} (units of (log10 P + 4)/4)")
    assert feature_error < 1e-2, f"our log-mel features differ from WhisperFeatureExtractor's by {feature_error:.2e}"
    extractor(audio, sampling_rate=SAMPLING_RATE, padding="longest")  # its first call, outside the rounds
    bench.rounds(
        {
            "ours log-mel": lambda: [audio_features(item) for item in items],
            "whisper per clip": lambda: [extractor(a, sampling_rate=SAMPLING_RATE, padding=False) for a in audio],
            "whisper batch": lambda: extractor(audio, sampling_rate=SAMPLING_RATE, padding="longest"),
        },
        args.rounds,
    )
    feature_ratios = [bench.show_ratio("ours log-mel", peer) for peer in ("whisper per clip", "whisper batch")]

    encoder, projector, ours = towers(args.layers)
    features, lengths = batch_features(feats, multiple=2 * ASR_1_7B["n_window"])
    mask = (np.arange(features.shape[2])[None, :] < lengths[:, None]).astype(np.int64)
    graphdef, state = nnx.split(ours)

    @jax.jit
    def forward(state, x, n, ids):
        return nnx.merge(graphdef, state)(x, n, ids)

    # the chunks that hold frames (`Qwen3ASR.prepare` passes them too): transformers computes no other
    ids = jax.device_put(chunk_ids(lengths, features.shape[2], 2 * ASR_1_7B["n_window"]))
    x, n = jax.device_put(features), jax.device_put(lengths)
    pt, pmask = torch.from_numpy(features), torch.from_numpy(mask)

    def theirs():
        with torch.no_grad():
            return projector(encoder(pt, pmask).last_hidden_state)

    out = forward(state, x, n, ids)  # compiles too
    tokens, valid = np.asarray(out.tokens), np.asarray(out.valid)
    expected = theirs().numpy()
    counts = chunk_tokens(lengths, ASR_1_7B["n_window"])
    assert (valid.sum(1) == counts).all() and expected.shape[0] == counts.sum()
    got = np.concatenate([row[:c] for row, c in zip(tokens, counts)])
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    print(f"tower: {counts.sum()} tokens of {len(audio)} clips; max difference {error:.1e} of the output's scale")
    assert error < 1e-4, f"ours and transformers' audio tokens differ by {error:.2e} relative"
    rows = bench.rounds(
        {"ours tower": lambda: forward(state, x, n, ids).tokens.block_until_ready(), "transformers": theirs},
        args.rounds,
    )
    tower_ratio = bench.show_ratio("ours tower", "transformers")
    per_s = {k: len(audio) / rows[k]["best"] for k in rows}
    stem_ratio = time_stems(bench, encoder, ours, features, args.rounds) if args.stem else None
    print("  clips/s, best: " + ", ".join(f"{k} {v:.2f}" for k, v in per_s.items()))
    bench.finish(
        args.out,
        dict(
            clips=len(audio),
            seconds=[len(a) / SAMPLING_RATE for a in audio],
            tokens=int(counts.sum()),
            layers=args.layers,
            max_relative_difference=error,
            feature_max_abs_difference=feature_error,
            clips_per_s_best=per_s,
            tower_ratio=tower_ratio,
            feature_ratios=feature_ratios,
            stem_ratio=stem_ratio,
        ),
    )


if __name__ == "__main__":
    main()
