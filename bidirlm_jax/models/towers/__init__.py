"""Modality towers that feed the text stack: one sub-package per released tower."""
