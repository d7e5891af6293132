"""Modality towers that feed the text stack: vision (`qwen3_vl`) and audio (`qwen3_asr`), one sub-package each."""
