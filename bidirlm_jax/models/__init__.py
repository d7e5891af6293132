"""Model config, presets, layers, attention and the decoder stack."""
