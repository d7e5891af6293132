"""The whole Qwen3-ASR model against transformers 5.24's `Qwen3ASRForConditionalGeneration` (tiny, random,
fp32, n_window 50 where transformers counts tokens right): a padded batch of three text rows (right-,
left- and un-padded) holding three clips of different lengths, causal and bidirectional.

The clips span several chunks (137, 250, 300 frames): there the -hf encoder's zero-padded tails are what
the release computes too, while its single-chunk clips are padded where the release's are not (the tower
tests cover that boundary against the per-clip oracle).

Tolerance: the project's 1e-4 relative to the largest reference value. The tower's ~2e-7 (its tests) feeds
two text layers whose longest fp32 reductions are the 128-term MLP and ≤ 42-token attention sums
(fp32_tol(128) ≈ 1.5e-5 per op, a handful of ops deep); a misplaced clip token, a wrong position or the
wrong attention mode moves the hidden states by 1e-2 or more. Measured: ~1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bidirlm_jax  # noqa: E402
from bidirlm_jax.errors import ConfigError  # noqa: E402
from bidirlm_jax.io.hf_config import read_runtime  # noqa: E402
from bidirlm_jax.testing import qwen3_asr as ref  # noqa: E402

REL_TOL = 1e-4  # see the module docstring


def hf_forward(hf, ids, mask, features, frames, *, bidirectional: bool):
    hf.config.text_config.is_causal = not bidirectional  # transformers' bidirectional switch (omni notes F7)
    try:
        with torch.no_grad():
            out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                     input_features=torch.as_tensor(features), input_features_mask=torch.as_tensor(frames),
                     output_hidden_states=True)  # fmt: skip
    finally:
        hf.config.text_config.is_causal = True
    return out.hidden_states[-1].numpy(), out.logits.numpy()


@pytest.fixture(scope="module")
def asr(tmp_path_factory):
    hf = ref.build_asr_model(ref.asr_config())
    path = tmp_path_factory.mktemp("qwen3_asr_hf")
    hf.save_pretrained(path)
    return hf, path


def _close(ours, theirs, mask):
    ours, theirs = np.asarray(ours)[mask], np.asarray(theirs)[mask]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=REL_TOL * np.abs(theirs).max())


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_matches_transformers(asr, attention):
    hf, path = asr
    ids, mask, features, frames = ref.asr_batch()
    model = bidirlm_jax.from_pretrained(path, attention=attention)
    out = model(ids, mask, input_features=features, input_features_mask=frames)
    hidden, logits = hf_forward(hf, ids, mask, features, frames, bidirectional=attention == "bidirectional")
    valid = mask.astype(bool)
    _close(out.hidden_states, hidden, valid)
    _close(out.logits, logits, valid)


def test_modes_and_clips_matter(asr):
    """The comparisons above can fail: bidirectional attention changes the first token, and the clips'
    tokens (not the placeholder's embedding) are what the text layers see."""
    _, path = asr
    ids, mask, features, frames = ref.asr_batch()
    causal = bidirlm_jax.from_pretrained(path)
    bidirectional = bidirlm_jax.from_pretrained(path, attention="bidirectional")
    first = [np.asarray(m(ids, mask, input_features=features, input_features_mask=frames).hidden_states)[0, 0]
             for m in (causal, bidirectional)]  # fmt: skip
    assert np.abs(first[0] - first[1]).max() > 1e-2
    with_audio = np.asarray(causal(ids, mask, input_features=features, input_features_mask=frames).hidden_states)
    text_only = np.asarray(causal(ids, mask).hidden_states)
    assert np.abs(with_audio[0, 2] - text_only[0, 2]).max() > 1e-2


def test_scanned_equals_unrolled(asr):
    _, path = asr
    ids, mask, features, frames = ref.asr_batch()
    unrolled = bidirlm_jax.from_pretrained(path)
    scanned = bidirlm_jax.from_pretrained(path, runtime=read_runtime(path, scan_layers=True))
    assert scanned.text.runtime.scan_layers and scanned.audio_tower.runtime.scan_layers
    expected = unrolled(ids, mask, input_features=features, input_features_mask=frames).hidden_states
    got = scanned(ids, mask, input_features=features, input_features_mask=frames).hidden_states
    _close(got, expected, mask.astype(bool))  # the scan regroups fp32 sums only


def test_placeholder_count_must_match(asr):
    _, path = asr
    ids, mask, features, frames = ref.asr_batch()
    model = bidirlm_jax.from_pretrained(path)
    short = ids.copy()
    short[0, 2] = 9  # one placeholder fewer than the clips' 18 + 33 + 39 tokens
    with pytest.raises(ConfigError, match="89 audio placeholders .* give 90 tokens"):
        model(short, mask, input_features=features, input_features_mask=frames)
    with pytest.raises(ConfigError, match="input_features of shape"):
        model(ids, mask, input_features=features[:, :64], input_features_mask=frames)
    holes = frames.copy()
    holes[0, 3] = 0
    with pytest.raises(ConfigError, match="prefix"):
        model(ids, mask, input_features=features, input_features_mask=holes)


def test_sharded_on_8_devices_equals_one(asr):
    """Parameters placed by their logical axes on a data × fsdp × tensor = 2 × 2 × 2 mesh (text and tower,
    scanned): the model computes what it computes on one device."""
    import jax
    from flax import nnx

    from bidirlm_jax import sharding

    _, path = asr
    ids, mask, features, frames = ref.asr_batch()
    model = bidirlm_jax.from_pretrained(path, runtime=read_runtime(path, scan_layers=True))
    inputs = model.prepare(ids, mask, features, frames)
    run = nnx.jit(lambda m, kw: m.hidden_states(**kw))
    expected = run(model, inputs)
    mesh = sharding.make_mesh(2, 2, 2)
    placed = sharding.place(model, mesh)
    q = placed.audio_tower.layers.self_attn.q_proj
    assert q[...].sharding.spec == sharding.logical_to_spec(("layers", "heads", "head_dim", "embed"), q.shape, mesh)
    with jax.set_mesh(mesh):
        got = run(placed, inputs)
    _close(got, expected, mask.astype(bool))  # sharded contractions regroup fp32 sums only
