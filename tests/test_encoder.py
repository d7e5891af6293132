"""`models.encoder`: one function from a mapping of inputs to pooled embeddings, shared by GradCache, `encode`
and the heads."""

import numpy as np

from bidirlm_jax.models.encoder import role_inputs


def test_role_inputs_read_full_and_short_names():
    ids, mask, pos = (np.full((2, 3), v, np.int32) for v in (1, 2, 3))
    batch = {"query_ids": ids, "query_mask": mask, "query_positions": pos, "positive_input_ids": ids, "labels": ids}
    query = role_inputs(batch, "query")
    assert sorted(query) == ["attention_mask", "input_ids", "positions"]
    np.testing.assert_array_equal(query["attention_mask"], mask)
    assert sorted(role_inputs(batch, "positive")) == ["input_ids"]
    assert role_inputs(batch, "negative") == {}
