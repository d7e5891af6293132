"""Qwen3-VL's text side against transformers 5.24's `Qwen3VLModel` (tiny, random, fp32): M-RoPE positions
(`get_rope_index`, exact), placeholders, DeepStack and the whole model in causal and bidirectional mode.

The whole-model bar is the project's 1e-4 relative (on valid tokens, to the largest reference value):
the tower's ~1e-6 (test_qwen3_vl_tower) feeds three text layers whose largest reductions are 128-term
MLP and 20-token attention sums; a wrong position, placeholder order or DeepStack layer moves the
hidden states by 1e-2 or more.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

from bidirlm_jax import sharding
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.hf import load_weights
from bidirlm_jax.io.hf_config import runtime_from_hf
from bidirlm_jax.io.hf_config_vision import qwen3_vl_config_from_hf
from bidirlm_jax.io.weights.load import TensorDict
from bidirlm_jax.models.towers.qwen3_vl.model import merge_placeholders
from bidirlm_jax.models.towers.qwen3_vl.rope_index import get_rope_index
from bidirlm_jax.testing import qwen3_vl as ref

REL_TOL = 1e-4  # see the module docstring
IMG, VS, VE = ref.IMAGE, ref.VISION_START, ref.VISION_END
# Six non-square images (merged tokens 6, 2, 3, 1, 4, 1) in three rows: right-padded, left-padded, full.
GRIDS = [(1, 4, 6), (1, 2, 4), (1, 6, 2), (1, 2, 2), (1, 4, 4), (1, 2, 2)]
T = 22


def _image(i: int) -> list[int]:
    t, h, w = GRIDS[i]
    return [VS] + [IMG] * (t * h * w // 4) + [VE]


def batch() -> tuple[np.ndarray, np.ndarray]:
    rows = [
        [5, 6, *_image(0), 7, 8, *_image(1), 9],  # two images, text between, right padding
        [*_image(2), 11, *_image(3), 12, 13, *_image(4), 14],  # three images, left padding
        [*_image(5), *range(20, 39)],  # an image first, then text to the end: no padding
    ]
    ids, mask = np.zeros((3, T), np.int64), np.zeros((3, T), np.int64)
    for b, row in enumerate(rows):
        at = slice(T - len(row), T) if b == 1 else slice(0, len(row))
        ids[b, at], mask[b, at] = row, 1
    return ids, mask


def pixels() -> np.ndarray:
    n = sum(t * h * w for t, h, w in GRIDS)
    return np.random.default_rng(0).uniform(-1, 1, (n, 1536)).astype(np.float32)


def hf_forward(hf, ids, mask, with_images=True) -> np.ndarray:
    kwargs = {}
    if with_images:
        kwargs = dict(pixel_values=torch.as_tensor(pixels()), image_grid_thw=torch.as_tensor(GRIDS),
                      mm_token_type_ids=torch.as_tensor((ids == IMG).astype(np.int64)))  # fmt: skip
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **kwargs)
    return out.last_hidden_state.numpy()


def rel_err(ours, theirs, mask) -> float:
    valid = np.asarray(mask).astype(bool)
    ours, theirs = np.asarray(ours, np.float64)[valid], np.asarray(theirs, np.float64)[valid]
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module", params=[True, False], ids=["causal", "bidirectional"])
def hf(request):
    """A DeepStack index past the tower's depth (3) is declared: two taps run, after text layers 0 and 1."""
    return ref.qwen3_vl_model(ref.qwen3_vl_config(causal=request.param, deepstack=(0, 1, 3)))


def ours_for(hf, scan: bool = False):
    config = qwen3_vl_config_from_hf(hf.config.to_dict())
    config = config.replace(text=config.text.replace(tie_word_embeddings=True))  # Qwen3VLModel has no LM head
    runtime = runtime_from_hf(hf.config.to_dict(), scan_layers=scan)
    return load_weights(TensorDict(ref.state_tensors(hf)), config, runtime)


def test_config_reads_the_tower_and_the_mode(hf):
    config = qwen3_vl_config_from_hf(hf.config.to_dict())
    assert config.vision.deepstack_visual_indexes == (0, 1, 3) and config.vision.taps == ((0, 0), (1, 1))
    assert (config.vision.depth, config.vision.hidden_size, config.vision.num_position_embeddings) == (3, 32, 16)
    assert config.vision.hidden_act == "gelu_pytorch_tanh" and config.vision.rope_theta == 10000.0
    assert config.image_token_id == IMG and config.text.mrope_section == (6, 5, 5)
    runtime = runtime_from_hf(hf.config.to_dict())
    assert runtime.attention == ("causal" if hf.config.text_config.is_causal else "bidirectional")


@pytest.mark.parametrize("padded", [True, False])
def test_get_rope_index_equals_transformers(hf, padded):
    ids, mask = batch()
    if not padded:  # every row full: the padding replaced by text
        ids, mask = np.where(mask == 1, ids, 3), None
    with torch.no_grad():
        theirs, deltas = hf.get_rope_index(
            torch.as_tensor(ids), torch.as_tensor((ids == IMG).astype(np.int64)), torch.as_tensor(GRIDS),
            attention_mask=None if mask is None else torch.as_tensor(mask),
        )  # fmt: skip
    ours, our_deltas = get_rope_index(ids, GRIDS, mask, image_token_id=IMG, spatial_merge_size=2)
    np.testing.assert_array_equal(ours, theirs.numpy())
    np.testing.assert_array_equal(our_deltas, deltas.numpy())


def test_get_rope_index_refuses_placeholders_that_do_not_fit_the_grids():
    ids, mask = batch()
    with pytest.raises(ConfigError, match=r"a run of 6 image placeholders for an image of grid \(1, 2, 4\)"):
        get_rope_index(ids, [(1, 4, 6), (1, 2, 4)][::-1] + GRIDS[2:], mask, image_token_id=IMG, spatial_merge_size=2)
    with pytest.raises(ConfigError, match="more runs"):
        get_rope_index(ids, GRIDS[:5], mask, image_token_id=IMG, spatial_merge_size=2)
    with pytest.raises(ConfigError, match="more images"):
        get_rope_index(ids, [*GRIDS, (1, 2, 2)], mask, image_token_id=IMG, spatial_merge_size=2)


def test_model_matches_transformers_scanned_or_not(hf):
    ids, mask = batch()
    unrolled, scanned = ours_for(hf), ours_for(hf, scan=True)
    inputs = unrolled.prepare(ids, mask, pixels(), GRIDS)
    run = nnx.jit(lambda m, kw: m.hidden_states(**kw))
    ours = run(unrolled, inputs)
    assert rel_err(ours, hf_forward(hf, ids, mask), mask) < REL_TOL
    # The same operations regrouped by other fusions (fp32 rounding only): far inside the parity bar.
    assert rel_err(run(scanned, inputs), ours, mask) < 1e-5
    out = unrolled(ids, mask, pixel_values=pixels(), image_grid_thw=GRIDS)  # the eager call: the same numbers
    assert out.logits.shape == (3, T, 1024)
    assert rel_err(out.hidden_states, ours, mask) < 1e-5


def test_sharded_on_8_devices_equals_one():
    """Parameters placed by their logical axes on a data × fsdp × tensor = 2 × 2 × 2 mesh (tower and text)."""
    model = ours_for(ref.qwen3_vl_model(ref.qwen3_vl_config(causal=False, deepstack=(0, 1, 3))))
    ids, mask = batch()
    inputs = model.prepare(ids, mask, pixels(), GRIDS)
    run = nnx.jit(lambda m, kw: m.hidden_states(**kw))
    expected = run(model, inputs)
    mesh = sharding.make_mesh(2, 2, 2)
    placed = sharding.place(model, mesh)
    qkv = placed.visual.layers[0].attn.qkv.weight[...]
    assert qkv.sharding.spec == P(None, "tensor", None, "fsdp")
    with jax.set_mesh(mesh):
        got = run(placed, inputs)
    # Sharded matmuls sum their contractions in other groups: fp32 regrouping only, as scanned vs unrolled.
    assert rel_err(got, expected, mask) < 1e-5


def test_parity_sees_the_deepstack_additions(hf):
    """Without the DeepStack additions the hidden states move far beyond the tolerance, so the parity test
    above holds the additions (their layers and positions) to transformers'."""
    ids, mask = batch()
    model = ours_for(hf)
    model.visual.config = model.visual.config.replace(deepstack_visual_indexes=(5, 6, 7))  # no tap runs
    assert rel_err(model(ids, mask, pixel_values=pixels(), image_grid_thw=GRIDS).hidden_states,
                   hf_forward(hf, ids, mask), mask) > 100 * REL_TOL  # fmt: skip


def test_text_only_is_the_text_model(hf):
    ids, mask = batch()
    ids = np.where(ids >= IMG, 4, ids)  # no placeholders: transformers uses positions 0..T-1 on every row
    ours = ours_for(hf)(ids, mask).hidden_states
    assert rel_err(ours, hf_forward(hf, ids, mask, with_images=False), mask) < REL_TOL


def test_bad_inputs_are_refused(hf):
    ids, mask = batch()
    model = ours_for(hf)
    short = ids.copy()
    short[0, 3] = 5  # one placeholder fewer than the images' tokens
    with pytest.raises(ConfigError, match="16 image placeholders"):
        model(short, mask, pixel_values=pixels(), image_grid_thw=GRIDS)
    with pytest.raises(ConfigError, match="pixel_values of shape"):
        model(ids, mask, pixel_values=pixels()[:-4], image_grid_thw=GRIDS)
    with pytest.raises(ConfigError, match="together"):
        model(ids, mask, pixel_values=pixels())


def test_merge_placeholders_fills_in_row_major_order():
    x = np.zeros((2, 3, 1), np.float32)
    slots = np.array([[False, True, True], [True, False, False]])
    tokens = np.array([[1.0], [2.0], [3.0], [99.0]], np.float32)  # a fourth (padding) token is never read
    np.testing.assert_array_equal(np.asarray(merge_placeholders(x, slots, tokens))[..., 0], [[0, 1, 2], [3, 0, 0]])
