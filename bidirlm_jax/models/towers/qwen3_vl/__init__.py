"""Qwen3-VL's vision tower (a ViT with DeepStack taps) and the text model it feeds (M-RoPE, placeholders)."""
