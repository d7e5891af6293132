"""Evaluation: retrieval metrics on local BEIR-layout data, and MTEB through an encoder adapter."""
