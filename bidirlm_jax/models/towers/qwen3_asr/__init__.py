"""Qwen3-ASR's AuT audio encoder (also BidirLM-Omni's audio tower): config, conv stem, encoder."""
