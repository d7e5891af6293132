"""Test and demo support: transformers reference models and shared builders (torch is imported only here)."""
