"""`bidirlm convert SRC DST`: between a Hugging Face directory and a bidirlm (orbax) checkpoint.

The direction follows SRC: an HF directory becomes a checkpoint, a checkpoint becomes an HF directory;
`to="hf"` re-exports an HF directory (another attention mode, dtype or shard size).
"""

from __future__ import annotations

import os
from pathlib import Path

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io import FORMATS
from bidirlm_jax.io.atomic import check_destination
from bidirlm_jax.io.checkpoint import is_checkpoint, recorded_dtypes, save_checkpoint
from bidirlm_jax.io.companions import companion_files
from bidirlm_jax.io.hf import from_pretrained, save_pretrained, stored_dtypes
from bidirlm_jax.io.shards import DEFAULT_MAX_SHARD_BYTES


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    attention: str | None = None,
    bidirectional_window: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    format: str = "transformers",
) -> Path:
    """Convert `src` into `dst`, carrying its companion files (`io.companions`: tokenizer, processors, …) along.
    An HF output is in `format` (`save_pretrained`'s: transformers' classes, or a released BidirLM checkpoint).

    Checkpoints hold fp32 master weights and record the dtype of every tensor of their source; an HF
    output keeps each tensor's source dtype unless `dtype` is given, so HF -> checkpoint -> HF and
    HF -> HF are bit-exact, mixed precisions included.
    """
    src_is_checkpoint = is_checkpoint(src)
    to = to or ("hf" if src_is_checkpoint else "checkpoint")
    if to not in FORMATS:
        raise ConfigError(f"--to must be {' or '.join(map(repr, FORMATS))}, got {to!r}")
    if format != "transformers" and to != "hf":
        raise ConfigError(f"--format {format} is a format of HF outputs; add --to hf (a checkpoint has one format)")
    check_destination(dst, overwrite=overwrite)
    model = from_pretrained(
        src, attention=attention, bidirectional_window=bidirectional_window, allow_pickle=allow_pickle
    )
    if src_is_checkpoint:
        source_dtype, tensor_dtypes = recorded_dtypes(src)
    else:
        tensor_dtypes = stored_dtypes(src, allow_pickle=allow_pickle)
        source_dtype = tensor_dtypes["embed_tokens.weight"]
    files = companion_files(src)
    if to == "checkpoint":
        return save_checkpoint(
            model, dst, overwrite=overwrite, extra_files=files, dtype=source_dtype, tensor_dtypes=tensor_dtypes
        )
    if dtype is not None:
        source_dtype, tensor_dtypes = dtype, None
    return save_pretrained(
        model,
        dst,
        dtype=source_dtype,
        tensor_dtypes=tensor_dtypes,
        overwrite=overwrite,
        extra_files=files,
        max_shard_bytes=max_shard_bytes,
        format=format,
    )
