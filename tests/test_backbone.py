"""The text stack's entries for the towers: `inputs_embeds` instead of ids, `[3, B, T]` M-RoPE positions and
additions to the residual stream after given layers (DeepStack), unrolled and scanned; and the feature
flags, which the model reads instead of the family."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.kernels.attention import attend
from bidirlm_jax.kernels.masks import Segments
from bidirlm_jax.models.masks import layer_specs
from bidirlm_jax.models.positions import rope_tables
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.transformer import Transformer, relayout

B, T = 2, 16
CONFIGS = {
    "gemma3": get_preset("tiny-gemma3"),  # embedding scale, sliding layers
    "qwen3": get_preset("tiny-qwen3"),  # 2 layers
}
RUNTIMES = {"gemma3": Runtime(attention="bidirectional"), "qwen3": Runtime()}
MROPE = (6, 5, 5)  # head_dim 32: 16 frequencies


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 512, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, -4:] = 0
    return ids, mask


def _model(config, scan: bool = False, runtime: Runtime = RUNTIMES["qwen3"]) -> Transformer:
    return relayout(Transformer(config, runtime, rngs=nnx.Rngs(0)), scan)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("family", CONFIGS)
def test_inputs_embeds_path_equals_ids_path(family, scan):
    model = _model(CONFIGS[family], scan, RUNTIMES[family])
    ids, mask = _inputs()
    expected = model.hidden_states(ids, mask)
    ours = model.hidden_states(inputs_embeds=model.embed(ids), attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))  # the same ops on the same values


def test_inputs_embeds_are_cast_to_the_compute_dtype():
    model = _model(CONFIGS["qwen3"], runtime=Runtime(dtype="bfloat16"))
    ids, mask = _inputs()
    embeds = np.asarray(model.embed(ids).astype(jnp.float32))  # a tower's fp32 output, bf16 values
    ours = model.hidden_states(inputs_embeds=embeds, attention_mask=mask)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(model.hidden_states(ids, mask), np.float32))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_three_equal_position_rows_are_bit_identical_to_rope(scan):
    plain = _model(CONFIGS["qwen3"], scan)
    config = CONFIGS["qwen3"].replace(mrope_section=MROPE)
    mrope = nnx.merge(nnx.graphdef(Transformer(config, Runtime(scan_layers=scan), rngs=nnx.Rngs(1))), nnx.state(plain))
    ids, mask = _inputs()
    positions = np.broadcast_to(np.arange(T), (B, T))
    today = np.asarray(plain.hidden_states(ids, mask))
    rows = np.stack([positions] * 3)
    np.testing.assert_array_equal(np.asarray(mrope.hidden_states(ids, mask, positions=rows)), today)
    # not vacuous: height/width positions that differ from the temporal ones change the output
    moved = rows.copy()
    moved[1] = moved[1] // 2
    assert np.abs(np.asarray(mrope.hidden_states(ids, mask, positions=moved)) - today).max() > 1e-3


def test_mrope_tables_take_each_frequency_from_its_axis():
    """Frequency j reads H where j ≡ 1 (mod 3), j < 3·5; W where j ≡ 2 (mod 3), j < 3·5; T elsewhere."""
    config = CONFIGS["qwen3"]
    positions = jnp.stack([jnp.full((1, 1), 7), jnp.full((1, 1), 11), jnp.full((1, 1), 13)])
    cos, _ = rope_tables(positions, config.rope_full, 32, jnp.float32, MROPE)
    axis_tables = [rope_tables(jnp.full((1, 1), p), config.rope_full, 32, jnp.float32)[0] for p in (7, 11, 13)]
    expected_axes = [1 if j % 3 == 1 and j < 15 else 2 if j % 3 == 2 and j < 15 else 0 for j in range(16)]
    for j, axis in enumerate(expected_axes):
        for column in (j, j + 16):  # cat(f, f)
            assert cos[0, 0, column] == axis_tables[axis][0, 0, column], (j, axis)


def _manual(model, ids, mask, add):
    """Embedding, each block called by hand with its RoPE table and kernel, additions, final norm."""
    cfg = model.config
    segments = Segments.of(mask, None, ids.shape)
    positions = jnp.broadcast_to(jnp.arange(T), ids.shape)
    x = model.embed(ids)
    for i, (block, lt) in enumerate(zip(model.layers, cfg.layer_types)):
        rope = rope_tables(positions, cfg.rope_for(lt), cfg.head_dim, jnp.float32)
        kernel = functools.partial(
            attend, spec=layer_specs(cfg, model.runtime)[lt], segments=segments
        )  # the block passes its scale
        x = block(x, rope, lambda q, k, v, scale, kernel=kernel: kernel(q, k, v, scale=scale))
        if i in add:
            x = x + add[i]
    return model.final_norm(x)


@pytest.mark.parametrize("layers", [(0,), (0, 2), (3,)], ids=["first", "first-and-third", "last"])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_additions_after_layers_equal_a_manual_computation(layers, scan):
    config = CONFIGS["gemma3"]  # 4 layers, sliding and global
    unrolled = _model(config, runtime=RUNTIMES["gemma3"])
    ids, mask = _inputs()
    keys = jax.random.split(jax.random.PRNGKey(3), len(layers))
    add = {k: jax.random.normal(key, (B, T, config.hidden_size)) for k, key in zip(layers, keys)}
    expected = np.asarray(_manual(unrolled, ids, mask, add))
    without = np.asarray(unrolled.hidden_states(ids, mask))
    assert np.abs(expected - without).max() > 1e-2  # the additions matter
    model = _model(config, scan, RUNTIMES["gemma3"])
    ours = np.asarray(nnx.jit(lambda m: m.hidden_states(ids, mask, add=add))(model))
    # fp32, jit-fused against eager, 4 layers of width 64 over O(1) activations: a few ulps per layer
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_scanned_additions_keep_the_rest_scanned_and_differentiable():
    model = _model(CONFIGS["gemma3"], True, RUNTIMES["gemma3"].replace(attention_impl="xla"))  # a kernel without scans
    ids, mask = _inputs()
    add = {0: jnp.ones((B, T, 64))}

    def loss(model, add):
        return jnp.sum(model.hidden_states(ids, mask, add=add) ** 2)

    eqns = jax.make_jaxpr(lambda add: loss(model, add))(add).jaxpr.eqns
    layer_scans = [e.params["length"] for e in eqns if e.primitive.name == "scan"]
    assert layer_scans == [3]  # layer 0 unrolled, layers 1..3 one scan
    grads = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(model, add)
    assert float(jnp.abs(grads[1][0]).max()) > 0


def test_bad_entries_are_refused():
    model = _model(CONFIGS["qwen3"])
    ids, mask = _inputs()
    with pytest.raises(ConfigError, match="layers 0..1"):
        model.hidden_states(ids, mask, add={2: jnp.zeros((B, T, 64))})
    with pytest.raises(ConfigError, match="exactly one"):
        model.hidden_states(ids, inputs_embeds=model.embed(ids))
    with pytest.raises(ConfigError, match="mrope_section"):
        model.hidden_states(ids, positions=np.zeros((3, B, T), np.int32))
    with pytest.raises(ConfigError, match="mrope_section"):
        CONFIGS["qwen3"].replace(mrope_section=(11, 5))


def test_the_model_reads_flags_not_the_family():
    """Gemma3's architecture under another family name computes the same: only the flags decide."""
    gemma = _model(CONFIGS["gemma3"], runtime=RUNTIMES["gemma3"])
    renamed = Transformer(CONFIGS["gemma3"].replace(family="qwen3"), RUNTIMES["gemma3"], rngs=nnx.Rngs(1))
    renamed = nnx.merge(nnx.graphdef(renamed), nnx.state(gemma))
    ids, mask = _inputs()
    np.testing.assert_array_equal(
        np.asarray(renamed.hidden_states(ids, mask)), np.asarray(gemma.hidden_states(ids, mask))
    )
    plain = CONFIGS["gemma3"].replace(norm_plus_one=False, post_norms=False, embed_scale=False)
    state = nnx.state(Transformer(plain, rngs=nnx.Rngs(0)))
    assert "post_attn_norm" not in state["layers"][0]
