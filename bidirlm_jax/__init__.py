"""bidirlm-jax: turn causal LLMs (Gemma3, Qwen3) into bidirectional encoders, in JAX/Flax."""
