"""Base pre-training: a small causal base made from scratch, offline (the tiny pipeline's steps 1-2), and the
same causal-LM stage continued from a base on other text (a small specialist of that text's domain)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bidirlm_jax.configs.sizes import QUICK, Size, lm_config
from bidirlm_jax.errors import ConfigError, Preempted
from bidirlm_jax.pipeline.corpus import held_out, stdlib_documents
from bidirlm_jax.pipeline.report import loss_summary
from bidirlm_jax.pipeline.timer import Timer


def _train_tokenizer(texts: list[str], size: Size, out: Path):
    """A byte-level BPE of `size.vocab_size` tokens; a Qwen3 base's ends with Qwen's chat and media markers
    (as Qwen3's own tokenizer has them), which its vision and audio specialists need."""
    from bidirlm_jax.io.tokenizer import MEDIA_TOKENS, train_tokenizer, with_media_tokens

    if size.family == "gemma3":
        return train_tokenizer(texts, size.vocab_size, out)
    first = size.vocab_size - len(MEDIA_TOKENS)
    tokenizer = with_media_tokens(train_tokenizer(texts, first), first)
    tokenizer.save_pretrained(out)
    return tokenizer


def _tokens_file(texts: list[str], tokenizer, path: Path) -> int:
    """The training text as one stream of ids (`<bos>` doc `<eos>` ...), for the causal-LM objective."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    stream = np.concatenate([np.asarray([*seq, tokenizer.eos_token_id], np.int32) for seq in ids])
    np.save(path, stream)
    return len(stream)


def _base_config(size: Size):
    from bidirlm_jax.models.config import FULL
    from bidirlm_jax.models.presets import get_preset

    shape = dict(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        num_kv_heads=size.num_kv_heads,
        head_dim=size.head_dim,
    )
    if size.family == "qwen3":
        ids = dict(bos_token_id=2, eos_token_id=1, pad_token_id=0)  # `io.tokenizer.SPECIAL_TOKENS`' ids
        return get_preset("tiny-qwen3", **shape, **ids, layer_types=(FULL,) * size.num_layers)
    if size.family != "gemma3":
        raise ConfigError(f"Size.family {size.family!r} is not 'gemma3' or 'qwen3'")
    pattern = get_preset("tiny-gemma3").layer_types
    return get_preset(
        "tiny-gemma3",
        **shape,
        query_pre_attn_scalar=size.head_dim,
        sliding_window=size.sliding_window,
        layer_types=tuple(pattern[i % len(pattern)] for i in range(size.num_layers)),
    )


def pretrain_base(
    out_dir: str | os.PathLike,
    texts: list[str] | None = None,
    *,
    size: Size = QUICK,
    timer: Timer | None = None,
    progress: bool = False,
) -> Path:
    """A small causal base made from scratch, offline: a byte-level BPE with `<mask>` trained on `texts`, a
    random Gemma3- or Qwen3-shaped model of `size` (`size.family`) and `size.lm_steps` steps of causal-LM pre-training (none: the random
    model as is). Writes `out_dir/data/` (tokenizer, token stream), `out_dir/runs/lm/` (the run) and returns
    `out_dir/base` (HF directory with its tokenizer). `texts`: default the docstrings of the packages the demo
    trains on. The demo's step 1-2; notebooks and tests use it for a checkpoint that needs no download."""
    from flax import nnx

    from bidirlm_jax.io.companions import companion_files
    from bidirlm_jax.io.hf import save_pretrained
    from bidirlm_jax.models.transformer import Transformer
    from bidirlm_jax.pipeline.stages import run_to_hf
    from bidirlm_jax.train import train

    out = Path(out_dir)
    data = out / "data"
    timer = timer or Timer(echo=lambda _: None)
    if texts is None:
        texts = [d.text for d in stdlib_documents() if not held_out(d.module)]
    with timer.phase("tokenizer") as note:
        tokenizer = _train_tokenizer(texts, size, data / "tokenizer")
        count = _tokens_file(texts, tokenizer, data / "train_tokens.npy")
        note["text"] = f"byte-level BPE, {len(tokenizer)} tokens with <mask>; {count:,} training tokens"
    with timer.phase("base: causal LM") as note:
        config = _base_config(size)
        model = Transformer(config, rngs=nnx.Rngs(0))
        if size.lm_steps == 0:
            note["text"] = f"{_params(config):,} parameters, random (no pre-training)"
            return save_pretrained(model, out / "base", extra_files=companion_files(data / "tokenizer"))
        save_pretrained(model, data / "base-init")
        run = out / "runs" / "lm"
        result = train(lm_config(size, data / "base-init", data / "train_tokens.npy", progress), str(run))
        if result["preempted"]:  # a half-trained base is no base: stop, exporting nothing
            raise Preempted(run, result["step"])
        base = run_to_hf(run, out / "base", attention="causal", tokenizer_from=data / "tokenizer")
        note["text"] = f"{_params(config):,} parameters, {size.lm_steps} steps, {loss_summary(run)}"
    return base


def _params(config) -> int:
    from bidirlm_jax.io.params import param_count

    return param_count(config)


def adapt_causal(
    base: str | os.PathLike, texts: list[str], out_dir: str | os.PathLike, *, size: Size, timer: Timer | None = None
) -> Path:
    """`out_dir/model`: the causal `base` (an HF directory with its tokenizer) trained further by causal LM on
    `texts` (`size.lm_steps` steps of `size.lm_batch` rows of `size.seq_len` tokens at `size.lm_learning_rate`),
    with the base's tokenizer: a specialist sharing the base's backbone. Writes `out_dir/data/train_tokens.npy`
    and `out_dir/runs/lm/` (the run) beside it."""
    from bidirlm_jax.io.tokenizer import load_tokenizer
    from bidirlm_jax.pipeline.stages import run_to_hf
    from bidirlm_jax.train import train

    out = Path(out_dir)
    timer = timer or Timer(echo=lambda _: None)
    with timer.phase("specialist: causal LM") as note:
        tokens = out / "data" / "train_tokens.npy"
        tokens.parent.mkdir(parents=True, exist_ok=True)
        count = _tokens_file(texts, load_tokenizer(base), tokens)
        run = out / "runs" / "lm"
        result = train(lm_config(size, Path(base), tokens, False), str(run))
        if result["preempted"]:
            raise Preempted(run, result["step"])
        model = run_to_hf(run, out / "model", attention="causal", tokenizer_from=base)
        note["text"] = f"{size.lm_steps} steps on {len(texts)} texts ({count:,} tokens), {loss_summary(run)}"
    return model
