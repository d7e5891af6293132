"""The Qwen3-VL vision tower against transformers 5.24's `Qwen3VLVisionModel` (tiny, random, fp32).

Tolerances: the largest reductions are the 1536-term patch projection and the 256-term merger
matmuls; fp32 regrouping (another summation order, XLA's vs torch's kernels) moves such a sum by
about √n·eps of its magnitude in practice and n·eps at worst (`fp32_tol`). Three blocks and a
merger stack a handful of these; every comparison below is relative to the largest reference value,
and 1e-5 (≈ 84 eps) covers that stack while a wrong tap, weight, GELU or segment moves outputs by 1e-2+.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import vision_utils

from bidirlm_jax.errors import CheckpointError, ConfigError
from bidirlm_jax.io.weights.vision import vision_from_tensors, vision_table, vision_to_tensors
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.towers.qwen3_vl.config import VisionConfig
from bidirlm_jax.models.towers.qwen3_vl.layout import vision_layout
from bidirlm_jax.models.towers.qwen3_vl.vision import VisionTower, relayout, rotary_tables
from bidirlm_jax.testing import qwen3_vl as ref
from bidirlm_jax.testing.tolerance import EPS32

REL_TOL = 1e-5  # see the module docstring
# Three non-square images, one of two frames (its frames attend separately), 52 patches.
GRIDS = [(1, 4, 6), (1, 6, 2), (2, 2, 4)]


def our_config(hf) -> VisionConfig:
    c = hf.config
    fields = {k: getattr(c, k) for k in ref.VISION}
    return VisionConfig(**fields, hidden_act=c.hidden_act, deepstack_visual_indexes=tuple(c.deepstack_visual_indexes))


def tensors(model) -> dict[str, np.ndarray]:
    return ref.state_tensors(model, "visual.")


def pixels(grids, seed=0) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3 * 2 * 16 * 16)).astype(np.float32)


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def hf():
    return ref.vision_tower()


@pytest.fixture(scope="module")
def hf_out(hf):
    with torch.no_grad():
        return hf(torch.as_tensor(pixels(GRIDS)), torch.as_tensor(GRIDS))


@pytest.fixture(scope="module")
def ours(hf):
    return vision_from_tensors(our_config(hf), tensors(hf))


def test_weight_table_covers_every_parameter_both_ways(hf, ours):
    table = vision_table(ours.config)
    assert {"visual." + e.hf_key for e in table.entries} == set(tensors(hf))
    back = vision_to_tensors(ours)
    for key, value in tensors(hf).items():
        np.testing.assert_array_equal(back[key], value)  # a reshape each way: bit-exact


def test_patch_embedding_is_the_conv3d(hf, ours):
    x = pixels(GRIDS)
    with torch.no_grad():
        theirs = hf.patch_embed(torch.as_tensor(x)).numpy()
    assert rel_err(ours.patch_embed(x), theirs) < REL_TOL


@pytest.mark.parametrize("side", [4, 48])
def test_layout_matches_transformers_vision_utils(side):
    grids = [(1, 4, 6), (1, 2, 2), (2, 4, 4), (1, 6, 2), (1, 2, 30), (1, 96, 2)]
    layout = vision_layout([grids], merge=2, side=side)
    grid_thw = torch.as_tensor(grids)
    index, weight = vision_utils.get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    np.testing.assert_array_equal(layout.interp_index[0], index.numpy())  # indices exact
    assert np.abs(layout.interp_weight[0] - weight.numpy()).max() <= 1e-7
    np.testing.assert_array_equal(layout.coords[0], vision_utils.get_vision_position_ids(grid_thw, 2).numpy())
    cu = vision_utils.get_vision_cu_seqlens(grid_thw).numpy()
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(layout.lengths[0])]), cu)


def test_layout_pads_rows_and_refuses_bad_grids():
    layout = vision_layout([[(1, 2, 2)], [(1, 2, 4), (1, 2, 2)]], 16, merge=2, side=4)
    assert layout.coords.shape == (2, 16, 2) and layout.lengths.tolist() == [[4, 0], [8, 4]]
    assert not layout.interp_weight[0, 4:].any() and not layout.interp_weight[1, 12:].any()
    with pytest.raises(ConfigError, match="multiple of the spatial merge size"):
        vision_layout([[(1, 3, 4)]], merge=2, side=4)
    with pytest.raises(ConfigError, match="do not fit"):
        vision_layout([[(1, 4, 4)]], 8, merge=2, side=4)


def test_rotary_tables_match(hf):
    grid_thw = torch.as_tensor(GRIDS)
    position_ids = vision_utils.get_vision_position_ids(grid_thw, 2)
    with torch.no_grad():
        cos, sin = hf.rotary_pos_emb(torch.zeros(1), position_ids)
    layout = vision_layout([GRIDS], merge=2, side=4)
    ours_cos, ours_sin = rotary_tables(layout.coords, 16, 10000.0)
    # cos/sin of the same fp32 angle; the angle's inverse frequency may differ by an ULP between libm's pow
    # and torch's, which moves the angle (at most ~6 here) by ~1 ULP and its cos/sin by as much.
    for a, b in ((ours_cos[0], cos), (ours_sin[0], sin)):
        assert np.abs(np.asarray(a) - b.numpy()).max() <= 8 * EPS32


def _rope_and_attend(ours, grids):
    layout = vision_layout([grids], merge=2, side=4)
    n = layout.coords.shape[1]
    return layout, rotary_tables(layout.coords, ours.config.head_dim, 10000.0), ours.attend_fn(layout, n)


def test_one_block_matches(hf, ours):
    x = np.random.default_rng(1).normal(size=(52, 32)).astype(np.float32)
    grid_thw = torch.as_tensor(GRIDS)
    with torch.no_grad():
        rope = hf.rotary_pos_emb(torch.as_tensor(x), vision_utils.get_vision_position_ids(grid_thw, 2))
        theirs = hf.blocks[0](torch.as_tensor(x), cu_seqlens=vision_utils.get_vision_cu_seqlens(grid_thw),
                              position_embeddings=rope).numpy()  # fmt: skip
    _, rope, attend_fn = _rope_and_attend(ours, GRIDS)
    assert rel_err(ours.layers[0](x[None], rope, attend_fn)[0], theirs) < REL_TOL


def test_mergers_match(hf, ours):
    x = np.random.default_rng(2).normal(size=(52, 32)).astype(np.float32)
    with torch.no_grad():
        final = hf.merger(torch.as_tensor(x)).numpy()
        deep = hf.deepstack_merger_list[1](torch.as_tensor(x)).numpy()
    assert rel_err(ours.merger(x[None])[0], final) < REL_TOL
    assert rel_err(ours.deepstack_mergers[1](x[None])[0], deep) < REL_TOL


def _check_tower(out, hf_out, rows, layout):
    """Each image's valid patches and tokens (rows hold `rows[b]` images back to back) against transformers'."""
    starts = np.cumsum([0] + [t * h * w for t, h, w in GRIDS])
    patches, tokens, deep = [], [], []
    for b in range(len(rows)):
        n = int(layout.lengths[b].sum())
        patches.append(np.asarray(out.last_hidden_state[b, :n]))
        tokens.append(np.asarray(out.tokens[b, : n // 4]))
        deep.append(np.asarray(out.deepstack[:, b, : n // 4]))
    order = [i for images in rows for i in images]
    expect = np.concatenate([hf_out.last_hidden_state[starts[i] : starts[i + 1]].numpy() for i in order])
    assert rel_err(np.concatenate(patches), expect) < REL_TOL
    expect_tokens = np.concatenate([hf_out.pooler_output[starts[i] // 4 : starts[i + 1] // 4].numpy() for i in order])
    assert rel_err(np.concatenate(tokens), expect_tokens) < REL_TOL
    ours_deep = np.concatenate(deep, axis=1)
    assert ours_deep.shape[0] == len(hf_out.deepstack_features) == 2
    for k, feature in enumerate(hf_out.deepstack_features):
        expect_k = np.concatenate([feature[starts[i] // 4 : starts[i + 1] // 4].numpy() for i in order])
        assert rel_err(ours_deep[k], expect_k) < REL_TOL


# One row holding every image (transformers' packing), and images spread over padded rows.
LAYOUTS = {"packed": [[0, 1, 2]], "rows": [[1], [2, 0], [1]]}


@pytest.mark.parametrize("rows", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_tower_matches_transformers(hf, hf_out, ours, rows):
    x = pixels(GRIDS)
    starts = np.cumsum([0] + [t * h * w for t, h, w in GRIDS])
    layout = vision_layout([[GRIDS[i] for i in images] for images in rows], 56, merge=2, side=4)
    batch = np.zeros((len(rows), 56, x.shape[1]), np.float32)
    for b, images in enumerate(rows):
        row = np.concatenate([x[starts[i] : starts[i + 1]] for i in images])
        batch[b, : len(row)] = row
    out = nnx.jit(lambda m, p, lay: m(p, lay))(ours, batch, layout)
    _check_tower(out, hf_out, rows, layout)


@pytest.mark.parametrize("impl", ["reference", "xla", "chunked"])
def test_every_kernel_path_matches(hf, hf_out, impl):
    """The tower through each CPU-runnable attention kernel (blocked is "auto"'s choice, tested above);
    chunked with 8-token blocks, so segments straddle blocks."""
    runtime = Runtime(attention_impl=impl, attention_block_q=8, attention_block_kv=8)
    tower = vision_from_tensors(our_config(hf), tensors(hf), runtime=runtime)
    layout = vision_layout([GRIDS], merge=2, side=4)
    _check_tower(tower(pixels(GRIDS)[None], layout), hf_out, [[0, 1, 2]], layout)


def test_scanned_equals_unrolled(hf, ours):
    scanned = vision_from_tensors(our_config(hf), tensors(hf), runtime=Runtime(scan_layers=True))
    assert scanned.layers.norm1.weight.shape == (3, 32)  # parameters stacked
    layout = vision_layout([GRIDS[:2], GRIDS[2:]], 40, merge=2, side=4)
    x = np.random.default_rng(3).uniform(-1, 1, (2, 40, 1536)).astype(np.float32)
    a, b = ours(x, layout), scanned(x, layout)
    for name in ("last_hidden_state", "tokens", "deepstack"):
        assert rel_err(getattr(b, name), getattr(a, name)) < REL_TOL
    back = relayout(scanned, False)
    for key, value in vision_to_tensors(ours).items():
        np.testing.assert_array_equal(vision_to_tensors(back)[key], value)


def test_deepstack_index_beyond_depth_is_carried_never_run():
    """The released Omni tower declares a tap at index = depth: its merger is loaded and written back,
    only the reachable taps run (transformers: the same two features)."""
    hf = ref.vision_tower(deepstack=(1, 3, 0))  # unsorted too: features come in block order, each by its own merger
    config = our_config(hf)
    assert config.taps == ((0, 2), (1, 0))
    tower = vision_from_tensors(config, tensors(hf))
    assert len(tower.deepstack_mergers) == 3
    assert "visual.deepstack_merger_list.1.linear_fc2.weight" in vision_to_tensors(tower)
    for key, value in tensors(hf).items():
        np.testing.assert_array_equal(vision_to_tensors(tower)[key], value)
    x = pixels(GRIDS)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(x), torch.as_tensor(GRIDS))
    layout = vision_layout([GRIDS], merge=2, side=4)
    out = tower(x[None], layout)
    assert out.deepstack.shape[0] == len(theirs.deepstack_features) == 2
    for k, feature in enumerate(theirs.deepstack_features):
        assert rel_err(out.deepstack[k, 0], feature.numpy()) < REL_TOL


def test_loading_refuses_tensors_of_another_config(hf):
    with pytest.raises(CheckpointError, match="missing"):
        vision_from_tensors(our_config(hf).replace(depth=4), tensors(hf))
    with pytest.raises(CheckpointError, match="shape"):
        vision_from_tensors(our_config(hf).replace(intermediate_size=48), tensors(hf))
    assert isinstance(vision_from_tensors(our_config(hf), tensors(hf)), VisionTower)
