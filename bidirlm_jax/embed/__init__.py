"""Embedding texts with a loaded model: `encode` (length buckets, cached `jit`, pooling); `bidirlm embed` is `cli.encoders`."""
