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
and place names); `sample_images` and `spoken` generate the media tasks of the tiny image / audio presets. `finetune.pooling`: `auto` (the paper: `last` for a causal model, `mean` for a
bidirectional one), `mean`, `first`, `last`, `late` (the BidirLM authors' default: per-token logits, then
their mean). `finetune.classifier`: `linear` (a bias-free probe; with `last` pooling the one transformers'
classes load), `eurobert` (the authors' released head: dense → GELU → classifier, with biases; what the
ablation uses), `auto` (`eurobert` for `late`, else `linear`). `finetune.labels="a,b,c"` fixes the label order (default: the dataset's
class names, else the sorted training labels). The run records its head and label map in
`WORKDIR/model/head.json`; every `evals.validation.every` steps it scores the validation split and keeps the
best step (`evals.validation.best_metric`, default accuracy / spearman / entity F1). The former
`finetune.validation_path`, `validation_split`, `eval_every`, `eval_batch_size` and `best_metric` still work,
with a deprecation warning.

Images and audio (§6's vision and audio specialists): with `model.towers=true` (a Qwen3-VL / Qwen3-ASR /
Omni checkpoint as `model.init_from`) records may hold `finetune.image_field` (default `image`: a path
relative to the record's file, or a parquet image cell) or `finetune.audio_field` (default `audio`: a path,
or a hub audio cell) beside `data.text_field` (optional then) and the label; every example is rendered in the
checkpoint's chat template (`finetune.template`) at the pixel budget `finetune.max_pixels` (0: the
checkpoint's preprocessor_config.json) and clip length `finetune.max_seconds`, towers frozen unless
`finetune.train_towers`.

Presets: `tiny` (the tiny Gemma3-shaped model on a generated task, learns in about a hundred steps on
a CPU); `tiny-image` (a tiny random Qwen3-VL on scikit-image's photographs, each with its own caption or
another's: true / false) and `tiny-audio` (a tiny random Qwen3-ASR on espeak-ng questions, each with the
passage that answers it or another: yes / no; needs espeak-ng), both offline; the paper's tasks, which name their datasets through `datasets` (online) and need
`model.init_from`: `xnli` (English XNLI, pair classification, 10k steps), `pan-x` (XTREME PAN-X English,
NER, 10k steps), `seahorse` (regression on local files `{"summary", "article", "label"}`, 5k steps); §6's specialists
(`model.init_from`: the merge of the specialist with the Bi+MNTP encoder, `bidirlm merge`):
`esnli-ve` (local e-SNLI-VE files, `data.path`: records `{"image": Flickr30k path, "hypothesis": str,
"label": "entailment" | "neutral" | "contradiction"}`, 3 labels, batch 32, 500 steps, 100 warm-up) and
`boolq-audio` (`hf:fixie-ai/boolq-audio`, online, or its parquet files as `data.path`: the spoken question
`audio` + `passage` → `answer` True / False, batch 14, 500 steps, 175 warm-up).
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
# §6's specialists (media in the `image` / `audio` field): (data.path, text field, label field, labels, batch, warmup)
_SPECIALISTS = {
    "esnli-ve": ("", "hypothesis", "label", "entailment,neutral,contradiction", 32, 100),
    "boolq-audio": ("hf:fixie-ai/boolq-audio", "passage", "answer", "", 14, 175),
}
PRESETS = ("tiny", "tiny-image", "tiny-audio", *_PAPER, *_SPECIALISTS)


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
            # media (model.towers): record fields, the prompt template, the pixel budget (0: the checkpoint's
            # preprocessor_config.json), the longest clip kept, and whether the towers train
            image_field="image",
            audio_field="audio",
            template="chat",
            max_pixels=0,
            max_seconds=30.0,
            train_towers=False,
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
    elif preset in ("tiny-image", "tiny-audio"):
        image = preset == "tiny-image"
        c.model.update(preset="tiny-qwen3-vl" if image else "tiny-qwen3-asr", towers=True)
        c.data.update(source="sample_images" if image else "spoken", seq_len=64, global_batch_size=8)
        c.finetune.update(dropout=0.0, max_pixels=128 * 128, max_seconds=4.0)
        c.finetune.update(synthetic_train_size=64, synthetic_validation_size=32)
        c.evals.validation.update(every=0, batch_size=8)
        c.optim.update(learning_rate=2e-3, warmup_steps=5, weight_decay=0.0)
        steps = 120 if image else 150  # the training split learnt by heart, held-out views well above chance
        c.train.update(steps=steps, checkpoint_every=steps // 2, log_every=5)
    elif preset in _SPECIALISTS:
        path, text, label, labels, batch, warmup = _SPECIALISTS[preset]
        c.model.update(towers=True, dtype="bfloat16")
        c.data.update(path=path, text_field=text, seq_len=512, global_batch_size=batch, seed=42)
        c.finetune.update(label_field=label, labels=labels, max_pixels=256 * 32 * 32)  # 256 merged image tokens
        c.optim.update(learning_rate=5e-5, warmup_steps=warmup)
        c.train.update(steps=500, seed=42, checkpoint_every=100, log_every=10)
        c.evals.validation.every = 100
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
