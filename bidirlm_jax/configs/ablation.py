"""The variant × task ablation of the paper (Figure 2) and its merge-ratio sweep (Figure 4).

    bidirlm ablate --config configs/ablation.py:tiny --workdir /tmp/ablation          # offline, minutes on a CPU
    bidirlm ablate --config configs/ablation.py:gemma3-270m --workdir runs/ablation \\
        --config.base=/ckpt/gemma-3-270m --config.paths.bi_mntp=runs/mntp-hf \\
        --config.task_paths.seahorse_train=/d/seahorse/train.jsonl ...

Keys:
- `base`: the causal base (an HF directory with its tokenizer); `"generate"` = a small Gemma3-shaped base
  pre-trained on the standard library's docstrings, as `bidirlm demo` makes it (`generate.*`: its size).
- `variants`: the table's rows, a comma-separated subset of Base, Bi+Base, Bi+MNTP, Bi+MNTP+Merge,
  Bi+Contrastive, Bi+MNTP+Contrastive (Base is required: every delta is against it).
- `paths.*`: variants made elsewhere (HF directories), taken as they are; the others are built from `base`
  by `bidirlm_jax.pipeline.variants` with the recipe `mntp` / `contrastive` (whole `configs/mntp.py` and
  `configs/contrastive.py` configs, so `--config.mntp.train.steps=...` works), `merge_ratio` and
  `contrastive_from`.
- `tasks`: the table's columns (see `bidirlm_jax.ablation.tasks`): generated `fruit`, `sentiment`, `names`,
  `docstrings`; the paper's `xnli`, `pan-x`, `seahorse`, `miracl`. `task_paths.*`: local files some need.
- `finetune.*`: applied to every sequence / token task's `configs/finetune.py` preset (0 or "" keeps the
  preset's value); `finetune.classifier` (sequence tasks): `eurobert`, the authors' released head that the
  paper's Figure 2 rows use (dense → GELU → classifier), or `linear` (a bias-free probe); `retrieval.*`: the contrastive fine-tuning of retrieval tasks (`steps=0`: zero-shot).
- `sweep.*`: the merge-ratio sweep — `adapted` ⊕ Base at `ratios` (weight on the base), scored by MNTP masked
  accuracy on held-out text (`texts`: a `.txt` / `.jsonl` file; empty = the generated held-out docstrings,
  else the first task's validation texts); `enabled=False` skips it.

Presets: `tiny` (everything generated, a few steps each: minutes on two CPU cores) and `gemma3-270m`,
`qwen3-0.6b` (the paper's §3 setting: its recipe configs, the tasks of Figure 2 with their datasets, 10k / 5k
fine-tuning steps at batch 32; give `base`, and usually `paths.*` for variants trained elsewhere).
"""

from pathlib import Path

from ml_collections import ConfigDict

from bidirlm_jax.errors import ConfigError

PAPER_PRESETS = ("gemma3-270m", "qwen3-0.6b")
PRESETS = ("tiny", *PAPER_PRESETS)
COMMAND = "ablate"  # the command that takes this config (the others are `bidirlm train`'s)
VARIANTS = "Base,Bi+Base,Bi+MNTP,Bi+Contrastive,Bi+MNTP+Contrastive"


def get_config(preset: str = "tiny") -> ConfigDict:
    from bidirlm_jax.configs import contrastive, mntp
    from bidirlm_jax.configs.sizes import FINETUNE_SCHEDULE, TINY_BASE, Size, stage_configs

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    c = ConfigDict()
    c.base = ""
    c.compilation_cache = True  # JAX's persistent cache in WORKDIR/jax-cache: cells of one shape compile once
    c.variants = VARIANTS
    c.paths = ConfigDict(dict(bi_base="", bi_mntp="", bi_mntp_merge="", bi_contrastive="", bi_mntp_contrastive=""))
    c.merge_ratio = 0.5
    c.contrastive_from = "Bi+MNTP"
    c.tasks = ""
    c.task_paths = ConfigDict(dict(seahorse_train="", seahorse_validation="", msmarco_pairs=""))
    c.finetune = ConfigDict(FINETUNE_SCHEDULE)
    c.retrieval = ConfigDict(dict(steps=1000, learning_rate=0.0, batch_size=0, seq_len=0, max_length=512))
    c.sweep = ConfigDict(
        dict(enabled=True, adapted="Bi+MNTP", ratios="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", texts="", max_texts=256)
    )
    # The generated base (base="generate"): `configs.sizes.Size` fields.
    c.generate = ConfigDict(TINY_BASE)
    if preset == "tiny":
        size = Size(
            **c.generate.to_dict(),
            mntp_steps=30,
            mntp_batch=16,
            contrastive_steps=30,
            contrastive_batch=16,
            contrastive_seq_len=48,
        )
        c.base = "generate"
        c.mntp, c.contrastive = stage_configs(size, Path("@generated"), None)  # paths into the generated data
        c.tasks = "fruit,sentiment,names,docstrings"
        c.finetune.update(
            steps=40,
            learning_rate=2e-3,
            batch_size=16,
            seq_len=32,
            eval_every=20,
            synthetic_train_size=512,
            synthetic_validation_size=128,
        )
        c.retrieval.update(steps=30, learning_rate=1e-3, batch_size=16, seq_len=48, max_length=64)
        c.sweep.update(ratios="0,0.25,0.5,0.75,1", max_texts=64)
    else:
        c.mntp = mntp.get_config(preset)
        c.contrastive = contrastive.get_config(preset)
        c.tasks = "miracl,xnli,seahorse,pan-x"
        c.finetune.update(batch_size=32, seed=42)  # steps, lengths, learning rates: configs/finetune.py's presets
        c.retrieval.update(steps=1000, batch_size=32)  # 1k steps of MS MARCO (paper-recipe §7.1)
    return c
