"""The vocabulary-chunked LM head + cross-entropy against optax on whole logits: values, argmax, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.kernels.cross_entropy import chunked_cross_entropy
from bidirlm_jax.testing.tolerance import fp32_tol

N, D, V = 37, 16, 203  # primes, so no chunk size divides the vocabulary by accident
# Chunking regroups the fp32 sums of a logit (D products), of a row's normaliser (V exponentials, online
# across chunks) and of the head's gradient (N rows): relative to the largest value, at most that many eps.
FP32_TOL = fp32_tol(D + V + N)
BF16_EPS = 2.0**-7  # bf16 keeps 8 significant bits


@pytest.fixture(scope="module")
def inputs():
    k = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k[0], (N, D))
    head = jax.random.normal(k[1], (V, D))
    # Half the targets are the argmax, so the accuracy check sees hits as well as misses.
    targets = jax.random.randint(k[2], (N,), 0, V).at[::2].set(jnp.argmax(hidden[::2] @ head.T, axis=-1))
    cotangent = jax.random.normal(k[3], (N,))  # a weighted sum exercises the per-row gradient scale
    return hidden, head, targets, cotangent


def _ours(chunk, softcap):
    def f(hidden, head, targets, cotangent):
        loss, correct = chunked_cross_entropy(hidden, head, targets, chunk_size=chunk, softcap=softcap)
        return jnp.sum(loss * cotangent), (loss, correct)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def _reference(softcap):
    def f(hidden, head, targets, cotangent):
        logits = jnp.dot(hidden, head.T, preferred_element_type=jnp.float32)
        if softcap is not None:
            logits = jnp.tanh(logits / softcap) * softcap
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(loss * cotangent), (loss, jnp.argmax(logits, axis=-1) == targets)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def _rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("chunk,softcap", [(64, None), (50, None), (V, None), (4096, None), (50, 3.0), (64, 3.0)])
def test_matches_optax_fp32(inputs, chunk, softcap):
    (_, (loss, correct)), grads = _ours(chunk, softcap)(*inputs)
    (_, (ref_loss, ref_correct)), ref_grads = _reference(softcap)(*inputs)
    assert loss.dtype == jnp.float32 and correct.dtype == jnp.bool_
    assert _rel(loss, ref_loss) <= FP32_TOL
    np.testing.assert_array_equal(correct, ref_correct)
    assert 0 < int(correct.sum()) < N
    for g, ref in zip(grads, ref_grads):
        assert _rel(g, ref) <= FP32_TOL


def test_bf16_inputs_accumulate_in_fp32(inputs):
    hidden, head, targets, cotangent = inputs
    hidden, head = hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
    (_, (loss, _)), (dhidden, dhead) = _ours(64, None)(hidden, head, targets, cotangent)
    up = lambda x: x.astype(jnp.float32)
    (_, (ref_loss, _)), ref_grads = _reference(None)(up(hidden), up(head), targets, cotangent)
    assert loss.dtype == jnp.float32 and dhidden.dtype == dhead.dtype == jnp.bfloat16
    assert _rel(loss, ref_loss) <= FP32_TOL  # the same bf16 products, exact in fp32, then fp32 sums
    # The gradients come back in bf16: one rounding each (half an eps), plus their fp32 sums of bf16 products
    assert _rel(dhidden, ref_grads[0]) <= 2 * BF16_EPS and _rel(dhead, ref_grads[1]) <= 2 * BF16_EPS


def test_whole_logits_never_exist(inputs):
    """No intermediate of the forward or the backward has the [N, V] shape."""
    jaxpr = str(
        jax.make_jaxpr(
            jax.grad(lambda h, w: chunked_cross_entropy(h, w, inputs[2], chunk_size=64)[0].sum(), argnums=(0, 1))
        )(*inputs[:2])
    )
    assert f"{N},{V}" not in jaxpr and f"{V},{N}" not in jaxpr
    assert f"{N},64" in jaxpr  # one chunk's logits


def test_rejects_bad_chunk_size(inputs):
    with pytest.raises(ConfigError, match="chunk_size"):
        chunked_cross_entropy(*inputs[:3], chunk_size=0)


def test_a_frozen_head_gets_no_gradient_computed():
    """Under LoRA the head is frozen (its input stops gradients): the backward skips the [V, d] head gradient's
    matmul, and the hidden states' gradient is the same."""
    hidden = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
    head = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
    targets = jnp.arange(8, dtype=jnp.int32)

    def loss(h, w):
        return chunked_cross_entropy(h, w, targets, chunk_size=24)[0].sum()

    frozen = jax.grad(lambda h: loss(h, jax.lax.stop_gradient(head)))
    both = jax.grad(loss, argnums=(0, 1))

    def dots(f, *args) -> int:
        return str(jax.make_jaxpr(f)(*args)).count("dot_general")

    assert dots(frozen, hidden) == dots(both, hidden, head) - 1
    np.testing.assert_array_equal(frozen(hidden), both(hidden, head)[0])
