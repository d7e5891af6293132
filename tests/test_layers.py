"""Per-layer parity with transformers (torch, tiny, fp32): RMSNorm of both kinds, RoPE (default and linear),
Qwen3-VL's interleaved M-RoPE, the MLP and one decoder block of each family; our layers are built from the
flags `io.hf_config` maps each transformers config to."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen3VLTextConfig
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3_vl import modeling_qwen3_vl

from bidirlm_jax.io.hf_config import config_from_hf
from bidirlm_jax.io.weights.text import weight_table
from bidirlm_jax.kernels.attention import attend
from bidirlm_jax.kernels.masks import MaskSpec, Segments
from bidirlm_jax.models.layers import MLP, LayerNorm, RMSNorm
from bidirlm_jax.models.positions import apply_rope, rope_tables
from bidirlm_jax.models.transformer import Block
from bidirlm_jax.testing import reference

B, T, D = 2, 12, 64
# fp32 on both sides, different summation orders: contractions of at most 128 terms over O(1) values give
# 1.19e-7 × 128 ≈ 1.5e-5 at worst; elementwise layers (norms, rotations) a few ulps.
BLOCK_TOL = 2e-5
ELEMENTWISE_TOL = 2e-6
FAMILIES = {"gemma3": (reference.gemma3_config, modeling_gemma3), "qwen3": (reference.qwen3_config, modeling_qwen3)}


def _x(shape=(B, T, D), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _randomise(module: torch.nn.Module, *, plus_one: bool) -> None:
    """Weights away from their initial values: norms near 1 as they act ((1 + w) or w), the rest ~0.1."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=generator)
            p.copy_(noise + (1.0 if "norm" in name and not plus_one else 0.0))


def _torch(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x))  # a writable copy (broadcast views are read-only)


def test_layernorm():
    theirs = torch.nn.LayerNorm(D, eps=1e-6)
    _randomise(theirs, plus_one=True)  # weight and bias both away from their initial values
    ours = LayerNorm(D, eps=1e-6, param_dtype="float32", rngs=nnx.Rngs(0))
    ours.weight[...] = jnp.asarray(theirs.weight.detach().numpy())
    ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())
    x = 3.0 + _x()  # an offset mean, which the centring must remove
    expected = theirs(_torch(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, rtol=ELEMENTWISE_TOL, atol=ELEMENTWISE_TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_rmsnorm(family):
    make, modeling = FAMILIES[family]
    config = config_from_hf(make().to_dict())
    theirs = (modeling.Gemma3RMSNorm if family == "gemma3" else modeling.Qwen3RMSNorm)(D, eps=config.rms_norm_eps)
    _randomise(theirs, plus_one=config.norm_plus_one)
    ours = RMSNorm(D, eps=config.rms_norm_eps, plus_one=config.norm_plus_one, param_dtype="float32", rngs=nnx.Rngs(0))
    ours.weight[...] = jnp.asarray(theirs.weight.detach().numpy())
    x = _x()
    expected = theirs(_torch(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, rtol=ELEMENTWISE_TOL, atol=ELEMENTWISE_TOL)


@pytest.mark.parametrize(
    "rope", [{"rope_type": "default"}, {"rope_type": "linear", "factor": 4.0}], ids=["default", "linear"]
)
def test_rope_tables_and_rotation(rope):
    hf = reference.qwen3_config(rope_parameters={**rope, "rope_theta": 10_000.0})
    config = config_from_hf(hf.to_dict())
    positions = np.stack([np.arange(T), np.arange(5, 5 + T)]) * 7  # up to ~120: range reduction stays exact
    q = _x((B, hf.num_attention_heads, T, hf.head_dim), seed=1)
    cos, sin = modeling_qwen3.Qwen3RotaryEmbedding(hf)(_torch(q), _torch(positions))
    ours_cos, ours_sin = rope_tables(jnp.asarray(positions), config.rope_full, config.head_dim, jnp.float32)
    np.testing.assert_allclose(np.asarray(ours_cos), cos.numpy(), atol=ELEMENTWISE_TOL)
    np.testing.assert_allclose(np.asarray(ours_sin), sin.numpy(), atol=ELEMENTWISE_TOL)
    rotated, _ = modeling_qwen3.apply_rotary_pos_emb(_torch(q), _torch(q), cos, sin)
    ours = apply_rope(jnp.asarray(q.transpose(0, 2, 1, 3)), ours_cos, ours_sin)
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 2, 1, 3), rotated.numpy(), atol=ELEMENTWISE_TOL)


@pytest.mark.parametrize("section", [[6, 5, 5], [24, 20, 20]], ids=["sums-to-half", "clipped"])
def test_mrope_against_qwen3_vl(section):
    hf = Qwen3VLTextConfig(
        vocab_size=512,
        hidden_size=D,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": section,
            "mrope_interleaved": True,
        },
    )
    config = config_from_hf({**hf.to_dict(), "model_type": "qwen3_vl_text"})
    assert config.mrope_section == tuple(section)
    rng = np.random.default_rng(2)
    positions = np.cumsum(rng.integers(0, 3, (3, B, T)), axis=-1)  # three different rows, as an image gives
    q = _x((B, 2, T, 32), seed=3)
    k = _x((B, 1, T, 32), seed=4)
    cos, sin = modeling_qwen3_vl.Qwen3VLTextRotaryEmbedding(hf)(_torch(q), _torch(positions))
    ours_cos, ours_sin = rope_tables(jnp.asarray(positions), config.rope_full, 32, jnp.float32, config.mrope_section)
    np.testing.assert_allclose(np.asarray(ours_cos), cos.numpy(), atol=ELEMENTWISE_TOL)
    np.testing.assert_allclose(np.asarray(ours_sin), sin.numpy(), atol=ELEMENTWISE_TOL)
    rq, rk = modeling_qwen3_vl.apply_rotary_pos_emb(_torch(q), _torch(k), cos, sin)
    for ours_in, theirs in ((q, rq), (k, rk)):
        ours = apply_rope(jnp.asarray(ours_in.transpose(0, 2, 1, 3)), ours_cos, ours_sin)
        np.testing.assert_allclose(np.asarray(ours).transpose(0, 2, 1, 3), theirs.numpy(), atol=ELEMENTWISE_TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp(family):
    make, modeling = FAMILIES[family]
    hf = make()
    config = config_from_hf(hf.to_dict())
    theirs = (modeling.Gemma3MLP if family == "gemma3" else modeling.Qwen3MLP)(hf)
    _randomise(theirs, plus_one=False)
    ours = MLP(D, config.intermediate_size, activation=config.activation, param_dtype="float32", rngs=nnx.Rngs(0))
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(ours, name)[...] = jnp.asarray(getattr(theirs, name).weight.detach().numpy())
    x = _x()
    expected = theirs(_torch(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), expected, rtol=BLOCK_TOL, atol=BLOCK_TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_block(family):
    """One decoder layer, bidirectional over unpadded rows (transformers' eager attention without a mask)."""
    make, modeling = FAMILIES[family]
    hf = make()
    config = config_from_hf(hf.to_dict())
    layer_class = modeling.Gemma3DecoderLayer if family == "gemma3" else modeling.Qwen3DecoderLayer
    theirs = layer_class(hf, layer_idx=1).eval()  # a global layer in both
    _randomise(theirs, plus_one=config.norm_plus_one)
    ours = Block(config, rngs=nnx.Rngs(0))
    weights = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    for entry in weight_table(config):
        if entry.path[:2] == ("layers", 0):
            node = ours
            for name in entry.path[2:-1]:
                node = getattr(node, name)
            getattr(node, entry.path[-1])[...] = jnp.asarray(
                entry.to_ours(weights[entry.hf_key.removeprefix("layers.0.")])
            )
    x = _x()
    positions = np.broadcast_to(np.arange(T), (B, T))
    rotary = (
        modeling_gemma3.Gemma3RotaryEmbedding(hf) if family == "gemma3" else modeling_qwen3.Qwen3RotaryEmbedding(hf)
    )
    args = (_torch(x), _torch(positions)) + (("full_attention",) if family == "gemma3" else ())
    expected = theirs(_torch(x), attention_mask=None, position_embeddings=rotary(*args))
    expected = (expected[0] if isinstance(expected, tuple) else expected).detach().numpy()
    rope = rope_tables(jnp.asarray(positions), config.rope_full, config.head_dim, jnp.float32)

    def kernel(q, k, v):
        return attend(q, k, v, MaskSpec(None, None), Segments.of(None, None, (B, T)), scale=config.attention_scale)

    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x), rope, kernel)), expected, rtol=BLOCK_TOL, atol=BLOCK_TOL)
