"""A tiny tokenizer with Qwen's chat and media special tokens at the tiny test models' stand-in ids
(`testing.qwen3_vl`: image 1000 … vision end 1003; `testing.qwen3_asr`: audio 1004 … 1006), so the
media data path renders real prompts for them; never downloaded."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from bidirlm_jax.io.tokenizer import train_tokenizer, with_media_tokens

FIRST_SPECIAL = 1000
_CORPUS = [
    "a photo of an astronaut in a white suit",
    "a cat sitting on a chair and looking at the camera",
    "a rocket standing on the launch pad before take-off",
    "coffee in a white cup on a saucer",
    "a page of printed text from an old book",
    "the quick brown fox jumps over the lazy dog",
    "user assistant query instruct",
] * 4


def media_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE under 1000 tokens with `io.tokenizer.MEDIA_TOKENS` from id 1000."""
    return with_media_tokens(train_tokenizer(_CORPUS, vocab_size=600), FIRST_SPECIAL)
