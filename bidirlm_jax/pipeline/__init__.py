"""The paper's pipeline, as parts that `bidirlm demo`, the ablation harness and notebooks share.

- `variants`: the variants of Figure 2 (Base, Bi+Base, Bi+MNTP, Bi+MNTP+Merge, Bi+Contrastive,
  Bi+MNTP+Contrastive) and the `Recipe` that makes them, built and reused under one directory;
- `stages`: the three ways a variant directory is made (attention switched, merged with the base, a training
  run exported);
- `corpus`: the standard library's docstrings as training text, pairs and a held-out retrieval set;
- `base`: a small causal base pre-trained from scratch, offline (`pretrain_base`);
- `evaluate`, `report`: every variant on the held-out set; the table and plot of deltas vs Base;
- `timer`: wall-clock and CPU seconds per phase.

The sizes of the tiny pipeline and its stages' training configs are `bidirlm_jax.configs.sizes` (the
configs sit below the pipeline, which takes its recipes from them).
"""
