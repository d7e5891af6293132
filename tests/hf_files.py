"""Reading Hugging Face checkpoint directories in tests: every tensor by name, and bit-exact comparison."""

import numpy as np

from bidirlm_jax.io.shards import ShardReader


def tensors(path) -> dict[str, np.ndarray]:
    reader = ShardReader(path)
    return {k: reader.get(k) for k in reader.keys()}


def assert_bit_exact(a, b) -> None:
    """Same tensor names, dtypes and bytes in two HF directories."""
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].tobytes() == tb[k].tobytes(), k
