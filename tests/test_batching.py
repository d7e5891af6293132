"""`data.batching`: buckets, padding, filler rows, packed rows and the pad-id rule, written once for every path."""

from types import SimpleNamespace

import numpy as np

from bidirlm_jax.data.batching import bucket_for, packed_row, pad_batch, pad_id, pad_rows


def test_pad_rows_right_pads_and_fills_with_the_first_sequence():
    ids, mask = pad_rows([[5, 6, 7], [8]], 4, 0, rows=3)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 0], [8, 0, 0, 0], [5, 6, 7, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    assert ids.dtype == mask.dtype == np.int32
    ids, _ = pad_batch([[1] * 17, [2]], 2, (16, 32, 64), 9)
    assert ids.shape == (2, 32) and ids[1, 1] == 9
    assert bucket_for(16, (16, 32)) == 16 and bucket_for(17, (16, 32)) == 32


def test_packed_row_layout():
    row = packed_row([np.array([4, 5, 6]), np.array([7, 8])], 7, 1, first_segment=3)
    np.testing.assert_array_equal(row["input_ids"], [4, 5, 6, 7, 8, 1, 1])
    np.testing.assert_array_equal(row["segment_ids"], [3, 3, 3, 4, 4, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 0])
    np.testing.assert_array_equal(row["attention_mask"], [1, 1, 1, 1, 1, 0, 0])
    assert {v.dtype for v in row.values()} == {np.dtype(np.int32)}


def test_pad_id_rule():
    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
