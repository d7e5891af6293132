"""Fine-tuning on downstream tasks: how the paper judges every variant (paper-recipe.md §1, §7.1).

    bidirlm train --config configs/finetune.py:tiny --workdir /tmp/ft                # generated task, offline
    bidirlm train --config configs/finetune.py:tiny --config.objective=token_classification --workdir /tmp/ner
    bidirlm train --config configs/finetune.py:xnli --workdir runs/xnli \\
        --config.model.init_from=out/bidirlm-270m --config.optim.learning_rate=5e-5

`objective`: `classification` | `regression` | `token_classification`. `data.source="labeled"` reads
`data.path` (training split: `.jsonl` / `.csv` / `.parquet` file or directory, or `hf:NAME[:CONFIG]` with
`finetune.train_split`); the validation split is `evals.validation.data` (`auto`: for `hf:` sources the same
dataset's `evals.validation.split`); fields: `data.text_field`, `finetune.text_pair_field` (pair tasks),
`finetune.label_field`, or `finetune.tokens_field` + `finetune.tags_field` (token tasks).
`data.source="synthetic"` generates a task (a fruit mentioned or not; the share of positive words; person
and place names). `finetune.pooling`: `auto` (the paper: `last` for a causal model, `mean` for a
bidirectional one), `mean`, `first`, `last`, `late` (the BidirLM authors' default: per-token logits, then
their mean). `finetune.classifier`: `linear` (a bias-free probe; with `last` pooling the one transformers'
classes load), `eurobert` (the authors' released head: dense → GELU → classifier, with biases; what the
ablation uses), `auto` (`eurobert` for `late`, else `linear`). `finetune.labels="a,b,c"` fixes the label order (default: the dataset's
class names, else the sorted training labels). The run records its head and label map in
`WORKDIR/model/head.json`; every `evals.validation.every` steps it scores the validation split and keeps the
best step (`evals.validation.best_metric`, default accuracy / spearman / entity F1). The former
`finetune.validation_path`, `validation_split`, `eval_every`, `eval_batch_size` and `best_metric` still work,
with a deprecation warning.

Presets: `tiny` (the tiny Gemma3-shaped model on a generated task, learns in about a hundred steps on
a CPU); the paper's tasks, which name their datasets through `datasets` (online) and need
`model.init_from`: `xnli` (English XNLI, pair classification, 10k steps), `pan-x` (XTREME PAN-X English,
NER, 10k steps), `seahorse` (regression on local files `{"summary", "article", "label"}`, 5k steps).
Protocol (§7.1): batch 32, 10 % warmup then a linear decay, AdamW; the paper sweeps 10 log-spaced
learning rates in [5e-6, 5e-3] (5e-5 is the default here: sweep it with --config.optim.learning_rate).
"""

from ml_collections import ConfigDict, config_dict

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.train.config import base_config

_PAPER = {
    # preset: (objective, data.path, text field, pair field, label / tags field, steps, seq_len)
    "xnli": ("classification", "hf:facebook/xnli:en", "premise", "hypothesis", "label", 10_000, 128),
    "pan-x": ("token_classification", "hf:google/xtreme:PAN-X.en", "tokens", "", "ner_tags", 10_000, 128),
    "seahorse": ("regression", "", "summary", "article", "label", 5_000, 512),
}
PRESETS = ("tiny", *_PAPER)


def get_config(preset: str = "tiny") -> ConfigDict:
    c = base_config()
    c.objective = "classification"
    c.model.update(attention="bidirectional", bidirectional_window="half")
    c.data.update(source="labeled", seq_len=128, global_batch_size=32)
    c.finetune = ConfigDict(
        dict(
            pooling="auto",  # auto | mean | first | last | late
            classifier="auto",  # auto | linear | eurobert (models.heads)
            dropout=0.1,
            pack=False,  # pack examples several per row in the step (no padding FLOPs); equal results at dropout 0
            num_labels=0,  # 0: as many as the label map; otherwise checked against it
            labels="",  # "neg,pos": explicit label order (default: ClassLabel names, else sorted training labels)
            train_split="train",  # hf: sources
            text_pair_field="",  # second text of pair tasks (NLI, paraphrase); empty: single text
            label_field="label",
            tokens_field="tokens",
            tags_field="tags",
            word_separator=" ",  # put before every word but the first when tokenising words (token tasks)
            synthetic_train_size=2048,
            synthetic_validation_size=256,
            # deprecated, mapped into evals.validation (data, split, every, batch_size, best_metric) when set
            validation_path=config_dict.placeholder(str),
            validation_split=config_dict.placeholder(str),
            eval_every=config_dict.placeholder(int),
            eval_batch_size=config_dict.placeholder(int),
            best_metric=config_dict.placeholder(str),
        )
    )
    c.evals.validation = ConfigDict(
        dict(
            kind="finetune",
            data="auto",  # FILE_OR_DIR; auto: an hf: dataset's `split` (synthetic data: a generated split)
            split="validation",  # hf: sources
            every=500,  # validation every N steps (0: at the end only)
            batch_size=32,
            best_metric="",  # default: accuracy | spearman | f1 (entity)
        )
    )
    c.optim.update(schedule="linear", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0)
    if preset == "tiny":
        c.model.preset = "tiny-gemma3"
        c.data.update(source="synthetic", seq_len=32, global_batch_size=16)
        c.finetune.dropout = 0.0
        c.evals.validation.every = 40
        c.optim.update(learning_rate=2e-3, warmup_steps=10, weight_decay=0.0)
        c.train.update(steps=120, checkpoint_every=40, log_every=10)
    elif preset in _PAPER:
        objective, path, text, pair, label, steps, seq_len = _PAPER[preset]
        c.objective = objective
        c.data.update(path=path, seq_len=seq_len, seed=42)
        if objective == "token_classification":
            c.finetune.update(tokens_field=text, tags_field=label)
        else:
            c.data.text_field = text
            c.finetune.update(text_pair_field=pair, label_field=label)
        c.optim.update(learning_rate=5e-5, warmup_steps=steps // 10)
        c.train.update(steps=steps, seed=42, checkpoint_every=500, log_every=50)
        c.evals.validation.every = 500
    else:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return c
