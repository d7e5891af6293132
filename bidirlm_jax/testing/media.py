"""A tiny tokenizer with Qwen's chat and media special tokens at the tiny test models' stand-in ids
(`testing.qwen3_vl`: image 1000 … vision end 1003; `testing.qwen3_asr`: audio 1004 … 1006), so the
media data path renders real prompts for them; never downloaded."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from bidirlm_jax.io.tokenizer import train_tokenizer

# In id order from 1000; the chat markers follow the media ones.
SPECIAL = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|audio_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|im_start|>",
    "<|im_end|>",
)
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
    """A byte-level BPE under 1000 tokens, reserved fillers up to id 1000, then `SPECIAL` from id 1000."""
    tokenizer = train_tokenizer(_CORPUS, vocab_size=600)
    fillers = [f"<|reserved_{i}|>" for i in range(FIRST_SPECIAL - len(tokenizer))]
    tokenizer.add_special_tokens({"additional_special_tokens": [*fillers, *SPECIAL]})
    assert tokenizer.convert_tokens_to_ids(SPECIAL[0]) == FIRST_SPECIAL
    return tokenizer
