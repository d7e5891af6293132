"""LM head + cross-entropy fused over vocabulary chunks, so `[N, vocab]` logits never exist whole.

Gemma3's vocabulary has 262,144 words: at 8192 tokens the fp32 logits alone take 8 GiB, and their
gradient as much again. Here the forward scans the head in chunks of `chunk_size` rows with an online
logsumexp and argmax (as MaxText's vocabulary tiling and Levanter's fused loss do); the backward
recomputes each chunk's logits, turns them into the logits' gradient, and emits that chunk's head
gradient while accumulating the hidden states' gradient in fp32. Peak extra memory is one
`[N, chunk_size]` block. The logits' gradient is cast to the activations' dtype before the backward
matmuls (bf16 in, fp32 accumulation out), and targets are matched by comparison with the chunk's ids
rather than by scatter.

A vocabulary that `chunk_size` does not divide needs no padded copy of the head: the last chunk starts
at `V - chunk_size`, overlapping its predecessor, and the already-counted columns are masked to -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bidirlm_jax.errors import ConfigError


def _chunk(head: jax.Array, i: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows of chunk `i` (the last one shifted back to end at V), their ids, and which are new."""
    vocab = head.shape[0]
    start = jnp.minimum(i * chunk, vocab - chunk)
    rows = jax.lax.dynamic_slice_in_dim(head, start, chunk, axis=0)
    ids = start + jnp.arange(chunk, dtype=jnp.int32)
    return rows, ids, ids >= i * chunk


def _logits(hidden: jax.Array, rows: jax.Array, softcap: float | None) -> jax.Array:
    logits = jnp.dot(hidden, rows.T, preferred_element_type=jnp.float32)
    return logits if softcap is None else jnp.tanh(logits / softcap) * softcap


def _num_chunks(vocab: int, chunk: int) -> int:
    return -(-vocab // chunk)


def _forward(hidden, head, targets, chunk, softcap):
    n = hidden.shape[0]

    def body(carry, i):
        m, s, target_logit, best, best_id = carry
        rows, ids, new = _chunk(head, i, chunk)
        logits = jnp.where(new, _logits(hidden, rows, softcap), -jnp.inf)
        m_new = jnp.maximum(m, logits.max(axis=1))
        s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(axis=1)
        hit = new & (ids == targets[:, None])
        target_logit = target_logit + jnp.where(hit, logits, 0.0).sum(axis=1)
        chunk_best = logits.max(axis=1)
        better = chunk_best > best  # strict: the first maximum wins, as jnp.argmax
        best_id = jnp.where(better, ids[jnp.argmax(logits, axis=1)], best_id)
        return (m_new, s, target_logit, jnp.maximum(best, chunk_best), best_id), None

    neg_inf = jnp.full((n,), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((n,), jnp.float32)
    init = (neg_inf, zeros, zeros, neg_inf, jnp.zeros((n,), jnp.int32))
    chunks = jnp.arange(_num_chunks(head.shape[0], chunk), dtype=jnp.int32)
    (m, s, target_logit, _, best_id), _ = jax.lax.scan(body, init, chunks)
    lse = m + jnp.log(s)
    return lse - target_logit, best_id == targets, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(hidden, head, targets, chunk, softcap):
    loss, correct, _ = _forward(hidden, head, targets, chunk, softcap)
    return loss, correct


def _fused_fwd(hidden, head, targets, chunk, softcap):
    # `symbolic_zeros`: the primals come wrapped, saying which are differentiated. A head that is not (frozen, as
    # under LoRA) gets no gradient: the backward skips its [V, d] of chunk gradients (an empty marker: None).
    hidden, wants_head, head, targets = hidden.value, () if head.perturbed else None, head.value, targets.value
    loss, correct, lse = _forward(hidden, head, targets, chunk, softcap)
    return (loss, correct), (hidden, head, targets, lse, wants_head)


def _fused_bwd(chunk, softcap, residuals, cotangents):
    hidden, head, targets, lse, wants_head = residuals
    g = cotangents[0].astype(jnp.float32)  # `correct` is boolean: no cotangent

    def body(dhidden, i):
        rows, ids, new = _chunk(head, i, chunk)
        logits = _logits(hidden, rows, softcap)
        probs = jnp.where(new, jnp.exp(logits - lse[:, None]), 0.0)
        dlogits = g[:, None] * (probs - (new & (ids == targets[:, None])))
        if softcap is not None:
            dlogits = dlogits * (1.0 - jnp.square(logits / softcap))  # d/dx c·tanh(x/c)
        dlogits = dlogits.astype(hidden.dtype)
        dhidden = dhidden + jnp.dot(dlogits, rows, preferred_element_type=jnp.float32)
        if wants_head is None:
            return dhidden, None
        drows = jnp.dot(dlogits.T, hidden, preferred_element_type=jnp.float32)
        return dhidden, drows.astype(head.dtype)

    vocab, d = head.shape
    count = _num_chunks(vocab, chunk)
    dhidden, drows = jax.lax.scan(body, jnp.zeros(hidden.shape, jnp.float32), jnp.arange(count, dtype=jnp.int32))
    if wants_head is None:
        return dhidden.astype(hidden.dtype), None, None
    # Chunks are disjoint except the last, whose first `overlap` rows its predecessor already emitted (as zeros here).
    overlap = count * chunk - vocab
    dhead = jnp.concatenate([drows[:-1].reshape(-1, d), drows[-1, overlap:]], axis=0)
    return dhidden.astype(hidden.dtype), dhead, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def chunked_cross_entropy(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, *, chunk_size: int, softcap: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-row cross-entropy of `softcap(hidden @ head.T)` against `targets`, and whether the argmax hits.

    hidden [N, d] and head [V, d] (transformers' [out, in] layout) in any float dtype, logits in fp32;
    targets int [N] in [0, V) (a row with another target gets its logsumexp as loss, so give it zero
    weight). `softcap` is Gemma's `final_logit_softcapping` (logits → c·tanh(logits/c)).
    Returns (loss fp32 [N], correct bool [N]); differentiable in `hidden` and `head`.
    """
    chunk = min(int(chunk_size), head.shape[0])
    if chunk <= 0:
        raise ConfigError(f"chunk_size must be a positive number of vocabulary rows, got {chunk_size}")
    return _fused(hidden, head, targets.astype(jnp.int32), chunk, None if softcap is None else float(softcap))
