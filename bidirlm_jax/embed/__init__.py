"""Embedding texts with a loaded model: `encode` (length buckets, cached `jit`, pooling) and `bidirlm embed`."""
