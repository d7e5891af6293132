"""Media towers feeding the text model: vision (`qwen3_vl`) and audio (`qwen3_asr`)."""
