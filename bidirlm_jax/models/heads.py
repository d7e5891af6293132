"""Task heads over the encoder: sequence classification / regression and token classification.

Sequence heads pool the final hidden states (`mean` | `first` | `last`: `models.encoder.pool_inputs`, positions
from the attention mask, so left and right padding agree) and score them with one of two classifiers:
- `linear`: a probe — dropout, then `score` (no bias). `last` with `score` is exactly transformers'
  `…ForSequenceClassification` (`score` has no bias there either), so it exports to those classes.
- `eurobert`: the BidirLM authors' released classifier (EuroBERT's `…ForSequenceClassification`):
  `dense` (+bias) → exact GELU → dropout → `classifier` (+bias). Their `bos` pooling is our `first`
  (position 0 under their right padding), their `mean` ours. Their `late` pooling (their default) runs
  `dense` → GELU → `classifier` on every token, then takes the masked mean of the per-token logits; it
  exists only with this classifier. Their code has no dropout (`finetune.dropout=0` matches it).
Regression is a sequence head with one output, squeezed: logits `[B]`.

The token head is transformers' `GenericForTokenClassification`: dropout, then `score` with a bias, on
every token (labels sit on each word's first sub-token; `data.labeled` aligns them).

Heads compute in fp32 whatever the encoder's compute dtype (they are tiny). Dropout draws from the `rng`
passed to the call; `rng=None` is evaluation (deterministic). Parameters hold no RNG state, so a model's
`nnx.state(model, nnx.Param)` is its whole state, as the train state expects.

`EncoderWithHead` is what the engine trains for these tasks: `encoder` (a `Transformer`, or a model with
towers — any class built as `(config, runtime, *, rngs)` whose batches `models.encoder.hidden_states` runs,
so image+text and audio+text rows take the same head on the same pooled hidden states) and `head`.
Its head is created first from the `Rngs`, so `head_params(config, head, seed=s)` equals the head of
`EncoderWithHead(config, head, rngs=nnx.Rngs(s))`: a run started from an HF checkpoint
(`with_encoder_params`) and a random init get the same head.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import ModelConfig
from bidirlm_jax.models.encoder import MODEL_INPUTS, Inputs, hidden_states, pool_inputs
from bidirlm_jax.models.layers import param
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, Runtime
from bidirlm_jax.models.transformer import Transformer

TASKS = ("classification", "regression", "token_classification")
HEAD_POOLINGS = ("mean", "first", "last", "late")
CLASSIFIERS = ("linear", "eurobert")  # a bias-free probe | the authors' dense → GELU → classifier
IGNORE_INDEX = -100  # token labels that do not score (special tokens, a word's later sub-tokens, padding)


@dataclass(frozen=True)
class HeadConfig:
    """What a head is: its task, output count, pooling and classifier (sequence tasks) and dropout rate.
    `classifier=""` picks `eurobert` for `late` pooling (the only one it has) and `linear` otherwise."""

    task: str
    num_labels: int
    pooling: str = "mean"
    dropout: float = 0.0
    classifier: str = ""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"head task {self.task!r} is not one of {TASKS}")
        if self.task == "regression" and self.num_labels != 1:
            raise ConfigError(f"a regression head has one output, not num_labels={self.num_labels}")
        if self.num_labels < 1 or (self.task != "regression" and self.num_labels < 2):
            raise ConfigError(
                f"a {self.task} head needs at least 2 labels, got num_labels={self.num_labels}; check the label map"
            )
        if not self.sequence:
            object.__setattr__(self, "pooling", "none")  # a token head pools nothing
            object.__setattr__(self, "classifier", "none")  # and has one layer (with a bias): transformers'
        elif self.pooling not in HEAD_POOLINGS:
            raise ConfigError(f"pooling {self.pooling!r} is not one of {HEAD_POOLINGS}; fix finetune.pooling")
        elif not self.classifier:
            object.__setattr__(self, "classifier", "eurobert" if self.pooling == "late" else "linear")
        elif self.classifier not in CLASSIFIERS:
            raise ConfigError(f"classifier {self.classifier!r} is not one of {CLASSIFIERS}; fix finetune.classifier")
        elif self.pooling == "late" and self.classifier != "eurobert":
            raise ConfigError(
                "pooling 'late' averages the per-token logits of the authors' dense → GELU → classifier head; set "
                "finetune.classifier=eurobert (a linear probe averaged per token is 'mean' pooling)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout {self.dropout} must lie in [0, 1); fix finetune.dropout")

    @property
    def sequence(self) -> bool:
        """One prediction per text (classification, regression) rather than per token."""
        return self.task != "token_classification"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HeadConfig:
        try:
            return cls(
                task=d["task"],
                num_labels=int(d["num_labels"]),
                pooling=d.get("pooling", "mean"),
                dropout=float(d.get("dropout", 0.0)),
                classifier=d.get("classifier", ""),  # runs recorded before the option: their pooling's default
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed head description {d!r}: {e!r}") from None


def _dense(x: jax.Array, w: nnx.Param, b: nnx.Param | None = None) -> jax.Array:
    """x [..., in] @ Wᵀ (+ b) in fp32, W stored [out, in] as transformers' `nn.Linear`."""
    y = jnp.einsum("...i,oi->...o", x, w[...].astype(jnp.float32))
    return y if b is None else y + b[...].astype(jnp.float32)


class SequenceHead(nnx.Module):
    """hidden [B, T, d] and the encoder's inputs (`models.encoder`) → fp32 logits [B, num_labels]."""

    def __init__(self, config: ModelConfig, head: HeadConfig, *, param_dtype: str, rngs: nnx.Rngs):
        d, n, dtype = config.hidden_size, head.num_labels, param_dtype
        self.pooling, self.kind = head.pooling, head.classifier
        self.dropout = nnx.Dropout(head.dropout)
        if head.classifier == "eurobert":
            self.dense = param(rngs, (d, d), (None, "embed"), dtype)
            self.dense_bias = param(rngs, (d,), (None,), dtype, init="zeros")
            self.classifier = param(rngs, (n, d), (None, "embed"), dtype)
            self.classifier_bias = param(rngs, (n,), (None,), dtype, init="zeros")
        else:
            self.score = param(rngs, (n, d), (None, "embed"), dtype)

    def __call__(
        self, hidden: jax.Array, inputs: Inputs, *, rng: jax.Array | None = None, num_texts: int | None = None
    ) -> jax.Array:
        pooled = functools.partial(pool_inputs, inputs=inputs, num_texts=num_texts)
        drop = functools.partial(self.dropout, deterministic=rng is None, rngs=rng)
        if self.kind == "linear":
            return _dense(drop(pooled(hidden, mode=self.pooling)), self.score)
        late = self.pooling == "late"
        x = hidden.astype(jnp.float32) if late else pooled(hidden, mode=self.pooling)
        h = jax.nn.gelu(_dense(x, self.dense, self.dense_bias), approximate=False)  # torch's nn.GELU(): exact
        logits = _dense(drop(h), self.classifier, self.classifier_bias)  # [B, n], or [B, T, n] when late
        return pooled(logits, mode="mean") if late else logits  # late: the mean of per-token logits


class TokenHead(nnx.Module):
    """hidden [B, T, d] → fp32 logits [B, T, num_labels] (transformers' token classification head)."""

    def __init__(self, config: ModelConfig, head: HeadConfig, *, param_dtype: str, rngs: nnx.Rngs):
        self.dropout = nnx.Dropout(head.dropout)
        self.score = param(rngs, (head.num_labels, config.hidden_size), (None, "embed"), param_dtype)
        self.score_bias = param(rngs, (head.num_labels,), (None,), param_dtype, init="zeros")

    def __call__(
        self, hidden: jax.Array, inputs: Inputs, *, rng: jax.Array | None = None, num_texts: int | None = None
    ) -> jax.Array:
        del inputs, num_texts  # every position gets logits; the labels say which score
        h = self.dropout(hidden.astype(jnp.float32), deterministic=rng is None, rngs=rng)
        return _dense(h, self.score, self.score_bias)


def make_head(config: ModelConfig, head: HeadConfig, *, param_dtype: str, rngs: nnx.Rngs) -> SequenceHead | TokenHead:
    return (SequenceHead if head.sequence else TokenHead)(config, head, param_dtype=param_dtype, rngs=rngs)


@jax.tree_util.register_dataclass
@dataclass
class HeadOutput:
    """What `EncoderWithHead.__call__` returns."""

    logits: jax.Array  # fp32: [B, L] classification, [B] regression, [B, T, L] token classification
    hidden_states: jax.Array  # [B, T, d], the encoder's final-normed hidden states


def text_config(config: Any) -> ModelConfig:
    """The text stack's config of a model (a model with towers holds it as `text`)."""
    return getattr(config, "text", config)


class EncoderWithHead(nnx.Module):
    """`model(input_ids, attention_mask=None, *, rng=None, **media) -> HeadOutput`: an encoder and a task head.

    Packed rows (`models.encoder`: several texts per row) pass `segment_ids`, `positions` and `num_texts`:
    sequence logits are then `[num_texts, ...]`, text k being segment k + 1. An encoder with towers takes a
    row-aligned media batch (`data.media.collate`: `positions` [B, 3, T], `pixel_values` and its layout,
    `input_features`, `audio_lengths`) as `media` keywords, the `models.encoder.MODEL_INPUTS` names."""

    def __init__(
        self,
        config: Any,
        head: HeadConfig,
        runtime: Runtime = DEFAULT_RUNTIME,
        *,
        rngs: nnx.Rngs,
        encoder: type[nnx.Module] = Transformer,
    ):
        self.head_config = head
        dtype = runtime.param_dtype
        self.head = make_head(text_config(config), head, param_dtype=dtype, rngs=rngs)  # first: see `head_params`
        self.encoder = encoder(config, runtime, rngs=rngs)

    @property
    def config(self) -> ModelConfig:
        return self.encoder.config

    @property
    def runtime(self) -> Runtime:
        return self.encoder.runtime

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        *,
        rng: jax.Array | None = None,
        segment_ids=None,
        positions=None,
        num_texts: int | None = None,
        **media,
    ) -> HeadOutput:
        unknown = set(media) - set(MODEL_INPUTS)
        if unknown:
            raise TypeError(f"unknown model inputs {sorted(unknown)}; the inputs are {MODEL_INPUTS}")
        input_ids = jnp.asarray(input_ids)
        mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
        inputs = {"input_ids": input_ids, "attention_mask": mask, "segment_ids": segment_ids, "positions": positions}
        inputs = {k: v for k, v in {**inputs, **media}.items() if v is not None}
        hidden = hidden_states(self.encoder, inputs)
        logits = self.head(hidden, inputs, rng=rng, num_texts=num_texts)
        if self.head_config.task == "regression":
            logits = logits[..., 0]
        return HeadOutput(logits=logits, hidden_states=hidden)


def head_params(config: Any, head: HeadConfig, *, seed: int, param_dtype: str = "float32") -> nnx.State:
    """The head parameters `EncoderWithHead(config, head, rngs=nnx.Rngs(seed))` starts with (small)."""
    return nnx.state(make_head(text_config(config), head, param_dtype=param_dtype, rngs=nnx.Rngs(seed)), nnx.Param)


def with_encoder_params(
    encoder_params: nnx.State, config: Any, head: HeadConfig, *, seed: int, param_dtype: str = "float32"
) -> nnx.State:
    """Full `EncoderWithHead` parameters from an encoder's (e.g. loaded from an HF checkpoint) and a fresh head."""
    parts = {"encoder": encoder_params, "head": head_params(config, head, seed=seed, param_dtype=param_dtype)}
    flat = [((name, *path), v) for name, part in parts.items() for path, v in nnx.to_flat_state(part)]
    return nnx.from_flat_state(flat)  # nested as `nnx.state(model, nnx.Param)` nests it


@functools.lru_cache(maxsize=16)
def abstract_model_with_head(
    config: Any, head: HeadConfig, runtime: Runtime = DEFAULT_RUNTIME, encoder: type[nnx.Module] = Transformer
) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state of an `EncoderWithHead` (no memory)."""
    build = lambda: EncoderWithHead(config, head, runtime, rngs=nnx.Rngs(0), encoder=encoder)
    return nnx.split(nnx.eval_shape(build))


def model_factory(
    config: Any, head: HeadConfig, runtime: Runtime = DEFAULT_RUNTIME, encoder: type[nnx.Module] = Transformer
):
    """`factory(rngs) -> EncoderWithHead`, what the train state builds instead of a bare encoder."""

    def factory(rngs: nnx.Rngs) -> EncoderWithHead:
        return EncoderWithHead(config, head, runtime, rngs=rngs, encoder=encoder)

    return factory


def attach_head(encoder: nnx.Module, head: HeadConfig, *, seed: int = 0) -> EncoderWithHead:
    """An `EncoderWithHead` around an existing encoder (e.g. `from_pretrained(...)`, towers or not) and a fresh
    head."""
    graphdef, _ = abstract_model_with_head(encoder.config, head, encoder.runtime, type(encoder))
    dtype = encoder.runtime.param_dtype
    params = with_encoder_params(nnx.state(encoder, nnx.Param), encoder.config, head, seed=seed, param_dtype=dtype)
    return nnx.merge(graphdef, params)
