"""A generated corpus with learnable structure, so `tiny` presets run offline and visibly learn.

Tokens follow a fixed random first-order Markov chain in which each token has a handful of likely
successors: a uniform guess costs ln(vocab) nats, the chain's entropy is about 1 nat, so a model that
learns anything shows a clear drop in loss within a few dozen steps.
"""

from __future__ import annotations

import numpy as np

_SUCCESSOR_PROBS = np.array([0.6, 0.2, 0.1, 0.05, 0.05])


def markov_tokens(vocab_size: int, num_tokens: int, *, seed: int = 0) -> np.ndarray:
    """`num_tokens` int32 token ids drawn from a random sparse Markov chain over `vocab_size` ids."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab_size, size=(vocab_size, len(_SUCCESSOR_PROBS)))
    choices = rng.choice(len(_SUCCESSOR_PROBS), size=num_tokens, p=_SUCCESSOR_PROBS)
    out = np.empty(num_tokens, np.int32)
    token = int(rng.integers(vocab_size))
    for i, choice in enumerate(choices.tolist()):
        out[i] = token
        token = int(successors[token, choice])
    return out
