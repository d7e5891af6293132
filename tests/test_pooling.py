"""Pooling: exact on hand-made arrays, and a padded batch through the real bidirectional model equals each
text alone, under left and right padding (llm2vec #68; prompt-exclusion code long assumed right padding)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import FULL, POOLING_MODES, SLIDING
from bidirlm_jax.models.pooling import pool
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.transformer import Transformer


@functools.partial(jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})  # compile-bound
def _encode_state(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state).hidden_states(ids, mask)


def _encode(model, ids, mask):
    return _encode_state(*nnx.split(model), ids, mask)


def test_pool_by_hand():
    hidden = np.arange(2 * 4 * 2, dtype=np.float32).reshape(2, 4, 2)
    mask = np.array([[1, 1, 1, 0], [0, 0, 1, 1]])  # right padding, left padding
    np.testing.assert_allclose(pool(hidden, mask, "mean"), [hidden[0, :3].mean(0), hidden[1, 2:].mean(0)])
    np.testing.assert_array_equal(pool(hidden, mask, "first"), [hidden[0, 0], hidden[1, 2]])
    np.testing.assert_array_equal(pool(hidden, mask, "last"), [hidden[0, 2], hidden[1, 3]])
    out = pool(jnp.asarray(hidden, jnp.bfloat16), mask)
    assert out.dtype == jnp.float32 and out.shape == (2, 2)
    with pytest.raises(ConfigError, match="pooling 'cls'"):
        pool(hidden, mask, "cls")


def test_padded_batch_equals_each_text_alone():
    # Gemma3 with sliding layers (window 8) on texts up to 20 tokens, bidirectional.
    config = get_preset("tiny-gemma3", num_layers=2, layer_types=(SLIDING, FULL))
    model = Transformer(config, Runtime(attention="bidirectional"), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths, t = (13, 20, 9), 20
    texts = [rng.integers(5, 512, n) for n in lengths]
    ids = np.zeros((3, t), np.int32)
    mask = np.zeros((3, t), np.int32)
    ids[0, :13], mask[0, :13] = texts[0], 1  # right padding
    ids[1], mask[1] = texts[1], 1  # full
    ids[2, -9:], mask[2, -9:] = texts[2], 1  # left padding
    hidden = _encode(model, ids, mask)
    alone = [_encode(model, x[None], np.ones((1, len(x)), np.int32)) for x in texts]
    for mode in POOLING_MODES:
        batch = np.asarray(pool(hidden, mask, mode))
        for i, h in enumerate(alone):
            single = np.asarray(pool(h, np.ones((1, lengths[i])), mode))[0]
            # alone vs padded: the same 64-wide layers in batches of other shapes (~fp32_tol(64) = 7.6e-6)
            np.testing.assert_allclose(batch[i], single, rtol=1e-5, atol=1e-5, err_msg=f"{mode} row {i}")


def test_first_token_sees_later_text():
    """Bidirectionality: appending text changes the first token's embedding; the causal twin (same weights)
    does not."""
    ids = np.random.default_rng(1).integers(5, 512, (1, 10)).astype(np.int32)
    short, full = np.ones((1, 10), np.int32), np.ones((1, 10), np.int32)
    short[0, 6:] = 0
    for attention, changes in (("bidirectional", True), ("causal", False)):
        model = Transformer(get_preset("tiny-qwen3"), Runtime(attention=attention), rngs=nnx.Rngs(0))
        first = [np.asarray(pool(_encode(model, ids, m), m, "first")) for m in (short, full)]
        assert (np.abs(first[0] - first[1]).max() > 1e-3) == changes, attention
