"""Hand-written compute kernels: memory-lean replacements for ops XLA would materialise whole."""
