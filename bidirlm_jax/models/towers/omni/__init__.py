"""BidirLM-Omni: the text stack fed by the Qwen3-VL vision tower and the AuT audio tower in one sequence."""
