"""models/config.py: the checks every ModelConfig passes, whatever file it came from."""

import pytest

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.presets import PRESETS


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
    with pytest.raises(ConfigError, match=message):
        PRESETS["tiny-gemma3"].replace(**change)
