"""MNTP: masked next-token prediction, the adaptation phase of BidirLM (bidirectional attention).

    bidirlm train --config configs/mntp.py:tiny --workdir /tmp/mntp          # built-in text, seconds on a CPU
    bidirlm train --config configs/mntp.py:qwen3-0.6b --workdir /mnt/bucket/runs/q06-mntp \\
        --config.model.init_from=/ckpt/Qwen3-0.6B --config.data.path=/data/fineweb-tokens

`data.path` takes `.txt` (a document per line), `.jsonl` (`data.text_field`), `.parquet`, directories or
globs of them, a `bidirlm tokenize` output (memory-mapped; the way to feed a real corpus), or `hf:NAME`
(streamed from the Hub when online). `data.mixture="english:0.8:/d/en;math:0.2:/d/math"` mixes sources
with exact token proportions and logs a loss per source. `evals.held_out.data="english:/d/en.jsonl;code:/d/code"`
logs the held-out loss and masked accuracy of each set every `evals.held_out.every` steps (`evals.registry`).

Presets: `tiny` (the 4-layer Gemma3-shaped test model with sliding layers, a BPE tokenizer trained on
the Python standard library's docstrings, which every machine has) and the paper's four sizes
(paper-recipe.md §2.4, the authors' code in method-notes.md §1): peak learning rates 5e-4 / 1e-4 /
7e-5 / 5e-5, 8192-token packed sequences, 288 × 8192 = 2,359,296 tokens per step in 3 micro-batches,
WSD with 1 % warmup and a linear decay to 0 over the last 10 % (the paper does not give the decay
length), AdamW β2 0.95, ε 1e-5, weight decay 0.1, clip 1.0, bf16 compute with fp32 master weights,
seed 42, 10B tokens (4,240 steps; at least 3 micro-batches, more where a device would hold more rows than
fit a 16 GB chip), 30 % masking with every selected token replaced by the mask id,
Gemma3 sliding layers `"half"` (|i−j| ≤ 256, as transformers' `use_bidirectional_attention`).
"""

from ml_collections import ConfigDict, config_dict

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.train.config import base_config

_SIZES = {"gemma3-270m": 5e-4, "qwen3-0.6b": 1e-4, "gemma3-1b": 7e-5, "qwen3-1.7b": 5e-5}
# Rows of 8192 tokens one device's micro-batch may hold: what fits a 16 GB chip with the state split over
# 8 devices (remat "full", scanned layers; BENCHMARKS.md "Memory at 8192 tokens", rounded down). Raise it
# on larger chips: fewer micro-batches, same global batch.
_ROWS_PER_DEVICE = {"gemma3-270m": 8, "qwen3-0.6b": 4, "gemma3-1b": 4, "qwen3-1.7b": 4}
PRESETS = ("tiny", *_SIZES)


def get_config(preset: str = "tiny") -> ConfigDict:
    c = base_config()
    c.objective = "mntp"
    c.model.update(attention="bidirectional", bidirectional_window="half")
    c.data.source = "text"
    c.mntp = ConfigDict(
        dict(
            mask_ratio=0.3,  # share of eligible tokens selected (not specials, padding or a document's first token)
            mask_token="auto",  # the tokenizer's mask token (Gemma3 <mask> = 4); Qwen3: 151663; or a token / id
            strategy="mask",  # mask: every selected token -> mask id (BidirLM); bert: 80/10/10
            capacity_factor=1.2,  # sparse head slots per row = ceil(factor * ratio * seq_len); overflow is logged
            chunk_size=16384,  # vocabulary chunk of the fused LM head + cross-entropy
            sparse=True,  # LM head only where a masked token is predicted
            # deprecated, mapped into evals.held_out (data, every, texts) when set
            eval_data=config_dict.placeholder(str),
            eval_every=config_dict.placeholder(int),
            eval_texts=config_dict.placeholder(int),
        )
    )
    c.evals.held_out = ConfigDict(
        dict(
            kind="mntp",
            data="",  # held-out sets "NAME:PATH;NAME:PATH": eval/loss/NAME, eval/masked_accuracy/NAME ("": off)
            every=0,  # steps between held-out evaluations (0: the last step only)
            texts=256,  # documents read from each held-out set
        )
    )
    c.optim.update(b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, grad_clip_norm=1.0, schedule="wsd")
    if preset == "tiny":
        c.model.preset = "tiny-gemma3"
        c.data.update(source="stdlib", seq_len=128, global_batch_size=16)
        c.optim.update(learning_rate=5e-3, warmup_steps=10, decay_fraction=0.2, weight_decay=0.0)
        c.mntp.update(chunk_size=128, capacity_factor=1.5)  # short rows: more room for the masked count's spread
        c.train.update(steps=150, checkpoint_every=50, log_every=10)
    elif preset in _SIZES:
        # remat "save_dots" keeps 3-4x the temporaries of "full" at 8192 tokens: nothing past 270M fits 16 GB
        c.model.update(preset=preset, dtype="bfloat16", remat="full", scan_layers=True)
        c.data.update(seq_len=8192, global_batch_size=288)
        c.optim.update(learning_rate=_SIZES[preset], warmup_steps=42, decay_fraction=0.1, final_lr_fraction=0.0)
        c.train.update(steps=4240, seed=42, grad_accum_steps=3, checkpoint_every=250, log_every=10)
        c.train.max_rows_per_device = _ROWS_PER_DEVICE[preset]
        c.data.seed = 42
        c.mesh.update(data=1, fsdp=-1, tensor=1)
    else:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return c
