"""Losses, below both `train/` (which minimises them) and `evals/` (which scores held-out data with the very
same functions): MNTP targets and the sparse MNTP loss (`mntp`), InfoNCE (`infonce`), next-token
cross-entropy (`causal_lm`) and the fine-tuning tasks' losses (`classification`). Token-sum losses follow
one contract (`base.LossFn`); nothing here imports `train/` or `evals/`."""
