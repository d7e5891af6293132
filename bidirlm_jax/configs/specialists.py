"""The paper's composition study (§6, Figures 6–8): a Bi+MNTP encoder merged with a causal specialist that
shares its backbone, each variant fine-tuned on the specialist's task.

    bidirlm ablate --config configs/specialists.py:tiny --workdir /tmp/specialists      # offline, minutes on a CPU
    bidirlm ablate --config configs/specialists.py:safety --workdir runs/safety \\
        --config.encoder=/ckpt/bi-mntp-qwen3-0.6b --config.specialist=/ckpt/Qwen3Guard-Gen-0.6B

Keys:
- `encoder`: the Bi+MNTP encoder (an HF directory), or `build`: made here from `base` with the MNTP recipe
  `mntp` (a whole `configs/mntp.py` config), as `bidirlm ablate`'s Bi+MNTP variant.
- `specialist`: the causal specialist (an HF directory: Qwen3Guard, Qwen3-VL, Qwen3-ASR, ...), or `build`:
  `base` adapted here by causal LM on the task's labelled training text ("TEXT => LABEL" lines, `adapt.*`),
  a specialist that has learnt the task generatively, as Qwen3Guard has.
- `base`: the causal base the built models start from (an HF directory), or `generate` (a small Gemma3-shaped
  base pre-trained on the standard library's docstrings, `generate.*`, as `bidirlm demo` makes it).
- `ratios`: the merges studied, as the weight on the specialist (the paper's 0, 0.25, 0.5, 0.75, 1); 0 is
  Bi+MNTP (the encoder's backbone with the specialist's towers, if any), 1 Bi+Specialist (the specialist read
  bidirectionally). `merge_ratio`: the merge the table and the learning curves show (the paper's 0.5).
- `task.*`: what each variant is fine-tuned on: a `configs/finetune.py` preset (`task.preset`) with the
  dotted keys of `task.settings` ("data.path=hf:...;finetune.label_field=is_safe") set on it; its score is
  the preset's best metric unless `task.metric` names another validation metric. `task.test_sets`:
  "NAME=DATA[@SPLIT];…" labelled test sets scored beside the validation at every evaluation (the paper's
  Safe and Aegis 2.0 beside BeaverTails: local files or `hf:` names, split `test` by default), each reported
  at the validation's best step.
- `finetune.*`: the schedule applied to that preset (0 or "" keeps the preset's value), as `bidirlm ablate`'s:
  `steps` (the paper: 500), `batch_size` (4 / 32 / 14), `eval_every` (the learning curves' resolution), ...

Presets: `tiny` (everything built here offline: a generated base, its Bi+MNTP, a specialist adapted on the
generated fruit task; fine-tuned on that task; minutes on two CPU cores) and the paper's three, which need
`encoder` and `specialist`: `safety` (Qwen3Guard-Gen-0.6B ⊕ Bi+MNTP Qwen3-0.6B on BeaverTails' safe / unsafe
labels through `datasets`, or local files as `task.settings`' `data.path`, batch 4), `vision`
(Qwen3-VL-2B-Instruct ⊕ Bi+MNTP Qwen3-1.7B on e-SNLI-VE: `configs/finetune.py`'s `esnli-ve` preset, local
files, batch 32) and `audio` (Qwen3-ASR-0.6B ⊕ Bi+MNTP Qwen3-0.6B on BoolQ-Audio: the `boolq-audio` preset,
batch 14). Each fine-tunes 500 steps.
"""

from pathlib import Path

from ml_collections import ConfigDict

from bidirlm_jax.errors import ConfigError

BUILD = "build"
PAPER_PRESETS = ("safety", "vision", "audio")
PRESETS = ("tiny", *PAPER_PRESETS)
COMMAND = "ablate"  # the command that takes this config
# preset: (finetune preset, its dotted settings, batch size, evaluation every N steps)
_PAPER = {
    "safety": (
        "xnli",
        "data.path=hf:PKU-Alignment/BeaverTails;finetune.train_split=30k_train;evals.validation.split=30k_test;"
        "data.text_field=prompt;finetune.text_pair_field=response;finetune.label_field=is_safe;data.seq_len=512",
        4,
        10,
    ),
    "vision": ("esnli-ve", "", 32, 25),
    "audio": ("boolq-audio", "", 14, 25),
}


def get_config(preset: str = "tiny") -> ConfigDict:
    from bidirlm_jax.configs.sizes import FINETUNE_SCHEDULE, TINY_BASE, Size, stage_configs

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    c = ConfigDict()
    c.encoder = ""
    c.specialist = ""
    c.base = ""
    c.compilation_cache = True  # JAX's persistent cache in WORKDIR/jax-cache: every cell has one shape
    c.ratios = "0,0.25,0.5,0.75,1"
    c.merge_ratio = 0.5
    c.task = ConfigDict(dict(name="", preset="tiny", settings="", metric="", test_sets=""))
    c.finetune = ConfigDict({**FINETUNE_SCHEDULE, "steps": 500, "seed": 42})
    c.adapt = ConfigDict(dict(steps=60, batch_size=16, learning_rate=1e-3, examples=1024, seed=1))
    c.generate = ConfigDict(TINY_BASE)  # the generated base (base="generate")
    size = Size(**c.generate.to_dict(), mntp_steps=30, mntp_batch=16)
    c.mntp = stage_configs(size, Path("@generated"), None)[0]  # used only when encoder = build
    if preset == "tiny":
        c.update(encoder=BUILD, specialist=BUILD, base="generate")
        c.task.update(name="fruit", settings="data.source=synthetic")
        c.finetune.update(
            steps=80,
            learning_rate=2e-3,
            batch_size=16,
            seq_len=32,
            eval_every=10,
            seed=0,
            synthetic_train_size=512,
            synthetic_validation_size=128,
        )
    else:
        task, settings, batch, every = _PAPER[preset]
        c.task.update(name={"safety": "beavertails", "vision": "e-snli-ve", "audio": "boolq-audio"}[preset])
        c.task.update(preset=task, settings=settings, metric="macro_f1" if preset == "safety" else "")
        c.finetune.update(batch_size=batch, eval_every=every)
    return c
