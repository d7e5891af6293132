"""MNTP corruption: which tokens become prediction targets and what the model sees in their place.

Masks are drawn on device from a JAX key, so a run resumed from its checkpointed RNG redraws exactly the
same masks. The default is what BidirLM's authors trained with: every eligible token is selected
independently with probability `ratio` and every selected token is replaced by the mask id. `"bert"`
is BERT's 80/10/10: of the selected, 80 % become the mask id, 10 % a random token, 10 % stay as they are
(all of them remain targets). Eligibility (`maskable`) comes from the data: special tokens, padding and
the first token of each document piece (nothing precedes it to predict it) are never selected.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bidirlm_jax.errors import ConfigError

STRATEGIES = ("mask", "bert")


def validate(*, ratio: float, mask_id: int, vocab_size: int, strategy: str = "mask") -> None:
    """Raise a `ConfigError` for masking settings that cannot work (checked before any compute)."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"mntp.mask_ratio must lie strictly between 0 and 1, got {ratio}")
    if not 0 <= mask_id < vocab_size:
        raise ConfigError(
            f"mask token id {mask_id} is outside the model's vocabulary [0, {vocab_size}); "
            "set mntp.mask_token to a token of the tokenizer"
        )
    if strategy not in STRATEGIES:
        raise ConfigError(f"mntp.strategy {strategy!r} is not one of {STRATEGIES}")


def _random_tokens(rng: jax.Array, shape: tuple[int, ...], vocab_size: int, excluded: Sequence[int]) -> jax.Array:
    """Uniform ids over [0, vocab_size) minus `excluded`: draw an index among the allowed ids, then step
    it over every excluded id at or below it (the k-th allowed id is k + #{excluded s : s − rank(s) ≤ k})."""
    excluded = np.unique(np.asarray(excluded, np.int64))
    excluded = excluded[(excluded >= 0) & (excluded < vocab_size)]
    index = jax.random.randint(rng, shape, 0, vocab_size - len(excluded), jnp.int32)
    if len(excluded) == 0:
        return index
    gaps = jnp.asarray(excluded - np.arange(len(excluded)), jnp.int32)
    return index + jnp.searchsorted(gaps, index, side="right").astype(jnp.int32)


def mask_tokens(
    rng: jax.Array,
    input_ids: jax.Array,
    maskable: jax.Array,
    *,
    ratio: float,
    mask_id: int,
    vocab_size: int,
    strategy: str = "mask",
    special_ids: Sequence[int] = (),
) -> tuple[jax.Array, jax.Array]:
    """(corrupted ids [B, T], masked bool [B, T]): the model's input and which positions are targets.

    `maskable` bool [B, T] marks eligible tokens. With `strategy="bert"`, random replacements are drawn
    uniformly from the vocabulary except `mask_id` and `special_ids` (pass the tokenizer's special ids,
    so that no BOS/EOS/pad appears mid-document).
    """
    validate(ratio=ratio, mask_id=mask_id, vocab_size=vocab_size, strategy=strategy)
    input_ids = jnp.asarray(input_ids)
    select_rng, action_rng, token_rng = jax.random.split(rng, 3)
    masked = jax.random.bernoulli(select_rng, ratio, input_ids.shape) & jnp.asarray(maskable, bool)
    if strategy == "mask":
        return jnp.where(masked, jnp.asarray(mask_id, input_ids.dtype), input_ids), masked
    action = jax.random.uniform(action_rng, input_ids.shape)
    replacement = jnp.where(
        action < 0.8,
        jnp.asarray(mask_id, input_ids.dtype),
        _random_tokens(token_rng, input_ids.shape, vocab_size, [mask_id, *special_ids]).astype(input_ids.dtype),
    )
    return jnp.where(masked & (action < 0.9), replacement, input_ids), masked
