"""models/config.py: the checks every ModelConfig passes, whatever file it came from, and a third family made of flags."""

import numpy as np
import pytest
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io import families, hf_config
from bidirlm_jax.models.config import FULL, SLIDING
from bidirlm_jax.models.presets import PRESETS
from bidirlm_jax.models.runtime import FIELDS, Runtime
from bidirlm_jax.models.transformer import Transformer, relayout


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention": "sideways"}, "attention"),
        ({"num_kv_heads": 3}, "multiple"),
        ({"bidirectional_window": "wide"}, "window"),
        ({"num_heads": 0}, "must be positive"),
    ],
)
def test_invalid_values_are_refused(change, message):
    """Architecture values by the config, run settings (attention mode, window) by the runtime that declares them."""
    with pytest.raises(ConfigError, match=message):
        if set(change) <= set(FIELDS):
            Runtime(**change)
        else:
            PRESETS["tiny-gemma3"].replace(**change)


# A made-up decoder, described to io only by table entries (io.families): Gemma's norms and embedding scale,
# GELU, no QK-norm, attention biases, an untied head and Qwen-style sliding layers past layer 1.
TOY_TEXT = {
    "model_type": "toy",
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "hidden_act": "gelu",
    "attention_bias": True,
    "tie_word_embeddings": False,
    "use_sliding_window": True,
    "sliding_window": 4,
    "max_window_layers": 1,
}
TOY_FLAGS = dict(norm_plus_one=True, embed_scale=True, qk_norm=False)


def test_a_third_family_is_a_config(monkeypatch):
    """A family unknown to the model is two table entries in io.families: its config.json reads into flags,
    the stack runs it in both attention modes, unrolled and scanned, and computes exactly what the same flags
    compute under a known family's name (the model never reads the name); exporting it is refused, saying why."""
    monkeypatch.setitem(families.TEXT_MODEL_TYPES, "toy", "toy")
    monkeypatch.setitem(families.FAMILY_FLAGS, "toy", TOY_FLAGS)
    config = hf_config.config_from_hf(TOY_TEXT)
    assert config.family == "toy" and {k: getattr(config, k) for k in TOY_FLAGS} == TOY_FLAGS
    assert config.layer_types == (FULL, SLIDING, SLIDING) and config.activation == "gelu"
    ids = np.random.default_rng(0).integers(0, 96, (2, 10))
    mask = np.ones((2, 10), np.int32)
    mask[1, 7:] = 0
    outputs = {}
    for attention in ("causal", "bidirectional"):
        runtime = Runtime(attention=attention)
        model = Transformer(config, runtime, rngs=nnx.Rngs(0))
        state = nnx.state(model)
        assert "q_norm" not in state["layers"][0]["attn"] and "q_bias" in state["layers"][0]["attn"]
        hidden = np.asarray(model.hidden_states(ids, mask))
        assert np.isfinite(hidden).all()
        renamed = Transformer(config.replace(family="qwen3"), runtime, rngs=nnx.Rngs(1))
        renamed = nnx.merge(nnx.graphdef(renamed), state)
        np.testing.assert_array_equal(np.asarray(renamed.hidden_states(ids, mask)), hidden)
        scanned = relayout(model, True)
        # The same fp32 operations in a scan: contractions of ≤64 terms over O(1) values, a few ulps apart at most.
        np.testing.assert_allclose(np.asarray(scanned.hidden_states(ids, mask)), hidden, rtol=1e-5, atol=1e-5)
        outputs[attention] = hidden
    assert not np.allclose(outputs["causal"], outputs["bidirectional"])  # the mode reaches the sliding layers
    with pytest.raises(ConfigError, match="family 'toy' has no transformers format.*io/families.py"):
        hf_config.config_to_hf(config)
