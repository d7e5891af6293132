"""What an objective brings to the engine, and the token-sum gradient strategy most objectives share.

The engine (`train.loop`, `train.step`) owns the mesh, the train state, the jitted step, checkpoints and
logging. An objective owns everything that differs between causal LM, MNTP and contrastive training:
its rows of data, how a batch becomes a loss and a gradient, the FLOPs of a step (for MFU) and how its
step metrics read in a log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from bidirlm_jax import sharding
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.run import saved_tokenizer
from bidirlm_jax.losses.base import Batch, LossFn

# grad_fn(graphdef, params, batch, rng) -> (mean loss, mean gradients, item count, mean metrics) of a global batch
GradFn = Callable[[nnx.GraphDef, nnx.State, Batch, jax.Array], tuple[jax.Array, nnx.State, jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Objective:
    """One objective, ready to train: data, gradient strategy, cost, reporting.

    `rows` is a grain `MapDataset` whose element `i` is global row `i` (the same on every process);
    batch `b` is rows `[b·B, (b+1)·B)` (`data.loader`). `report` turns a step's metrics (host floats)
    into what is logged. `tokenizer` (if any) and `run_files` are saved in the run's `model/`, so exports
    carry them.
    """

    rows: grain.MapDataset
    grad_fn: GradFn
    flops_per_step: float
    tokens_per_step: int
    report: Callable[[Mapping[str, float]], dict[str, float]] = dict
    tokenizer: Any = None
    # Objectives that train more than the `Transformer` (an encoder with a task head):
    model_factory: Callable[[nnx.Rngs], nnx.Module] | None = None  # builds the trained module (default: Transformer)
    init_params: Callable[[nnx.State], nnx.State] | None = None  # encoder params from `init_from` -> trained params
    run_files: Mapping[str, str] = dataclasses.field(default_factory=dict)  # extra files of `RUN/model/`
    key_metric: str = ""  # the step metric the run's log lines show beside the loss


def _micro_batches(batch: Batch, k: int) -> Batch:
    """[B, ...] → [k, B/k, ...] with row i in micro-batch i mod k: every micro-batch keeps rows on every
    device, so the split needs no communication."""

    def split(x: jax.Array) -> jax.Array:
        x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
        return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, dict(batch))


def token_sum_grads(loss_fn: LossFn, *, grad_accum: int = 1) -> GradFn:
    """Gradients of a loss that is a sum over items (tokens, masked targets), accumulated as sums.

    Micro-batches run in a `lax.scan` (activations of one live at a time) and everything is divided by
    the total item count at the end, so the result is the item-weighted mean over the whole global batch
    however it is split over devices and micro-batches (a mean of means would weight a short micro-batch
    like a long one). Wrong for losses whose terms span the batch, such as InfoNCE.
    """

    def grad_fn(graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, rng: jax.Array):
        def sums(p: nnx.State, mb: Batch, key: jax.Array):
            loss, count, metrics = loss_fn(nnx.merge(graphdef, p), mb, key)
            return loss, (count, metrics)

        grad_sums = jax.value_and_grad(sums, has_aux=True)
        if grad_accum == 1:
            (loss, (count, metrics)), grads = grad_sums(params, batch, rng)
        else:
            mbs = _micro_batches(batch, grad_accum)
            first = jax.tree.map(lambda x: x[0], mbs)
            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_sums, params, first, rng))

            def micro(carry, xs):
                mb, key = xs
                return jax.tree.map(jnp.add, carry, grad_sums(params, mb, key)), None

            keys = jax.random.split(rng, grad_accum)
            ((loss, (count, metrics)), grads), _ = jax.lax.scan(micro, zeros, (mbs, keys))
        denom = jnp.maximum(count, 1.0)
        mean = lambda x: x / denom
        return mean(loss), jax.tree.map(mean, grads), count, {k: mean(v) for k, v in metrics.items()}

    return grad_fn


# Sources whose text the run generates (training its tokenizer on it) or that hold token ids already.
OWN_TEXT_SOURCES = ("stdlib", "synthetic", "npy", "sample_images", "spoken", "omni_mix")
# Sources that read `data.path`, and what it must name.
PATH_SOURCES = {
    "text": "FILES_DIR_GLOB_OR_TOKENIZED_DIR (or data.mixture)",
    "npy": "FILE.npy (a 1-D array of token ids)",
    "pairs": "FILES_OR_DIRS (comma-separated)",
    "labeled": "FILE_DIR_OR_hf:NAME (the training split)",
}


def missing_tokenizer(config: ConfigDict) -> ConfigError:
    return ConfigError(
        f"objective {config.objective} needs the checkpoint's tokenizer: set --config.data.tokenizer=DIR or "
        "--config.model.init_from=HF_DIR"
    )


def trains_on_user_text(config: ConfigDict) -> bool:
    """A tiny random model on the user's `text` trains its BPE on that text; a real-size model is adapted from a
    checkpoint (`model.init_from`) and takes its tokenizer, so a missing one is refused before anything runs."""
    named = config.data.tokenizer or config.model.init_from
    return config.data.source == "text" and not named and str(config.model.get("preset") or "").startswith("tiny")


def check_tokenizer(config: ConfigDict) -> None:
    """A run on the user's text needs a tokenizer: `data.tokenizer`, `model.init_from`'s, or (tiny models) its own."""
    tiny_towers = config.model.get("towers") and not config.model.init_from  # a tower preset trains its own
    needs = config.data.source not in OWN_TEXT_SOURCES and not trains_on_user_text(config) and not tiny_towers
    if needs and not (config.data.tokenizer or config.model.init_from):
        raise missing_tokenizer(config)


def check_data_path(data: ConfigDict) -> None:
    """A source that reads `data.path` needs one (`text` may take `data.mixture` instead)."""
    if data.source in PATH_SOURCES and not data.path and not (data.source == "text" and data.get("mixture")):
        raise ConfigError(f"data.source={data.source!r} needs --config.data.path={PATH_SOURCES[data.source]}")


def run_tokenizer(config: ConfigDict, model: Any, workdir: Path):
    """The run's tokenizer: the one saved in its workdir (a resumed run keeps its own), else
    `data.tokenizer`, else `model.init_from`'s, else — on the built-in `stdlib` text, or the user's `text` files
    for a tiny model (`trains_on_user_text`) — a byte-level BPE of the model's vocabulary size trained on
    that text (deterministic, so a resumed run trains the same one). Checked against the model's embedding."""
    from bidirlm_jax.data.mixture import parse_mixture
    from bidirlm_jax.data.sources import iter_documents
    from bidirlm_jax.data.stdlib_text import stdlib_docstrings
    from bidirlm_jax.io.tokenizer import check_vocab, load_tokenizer, train_tokenizer, with_media_tokens
    from bidirlm_jax.models.towers.presets import MEDIA_FIRST_ID

    data = config.data
    text = getattr(model, "text", model)  # a model with towers: its text stack
    path = saved_tokenizer(workdir) or data.tokenizer or config.model.init_from
    user_text = ([p for *_, p in parse_mixture(data.mixture)] or [data.path]) if trains_on_user_text(config) else []
    if path:
        tokenizer = load_tokenizer(path)
    elif text is not model:  # a tiny tower preset: its media tokens from MEDIA_FIRST_ID
        tokenizer = train_tokenizer((doc for _, doc in stdlib_docstrings()), MEDIA_FIRST_ID)
        tokenizer = with_media_tokens(tokenizer, MEDIA_FIRST_ID)
    elif data.source == "stdlib":
        tokenizer = train_tokenizer((doc for _, doc in stdlib_docstrings()), model.vocab_size)
    elif any(user_text):
        texts = (doc for p in user_text for doc in iter_documents(p, text_field=data.text_field))
        tokenizer = train_tokenizer(texts, model.vocab_size)
    else:
        raise missing_tokenizer(config)
    check_vocab(tokenizer, text.vocab_size)
    return tokenizer
