"""Contrastive training: the second phase of BidirLM, turning an encoder into an embedding model.

    bidirlm train --config configs/contrastive.py:tiny --workdir /tmp/con       # mined pairs, offline, a minute
    bidirlm train --config configs/contrastive.py:qwen3-0.6b --workdir runs/q06-con \\
        --config.model.init_from=out/q06-mntp-merged --config.data.path=/data/kalm-en/ \\
        --config.contrastive.instructions=instructions.json

`model.init_from` takes the base (Bi+Contrastive), an MNTP export or a merged directory
(Bi+MNTP+Contrastive). `data.path`: `.jsonl`/`.parquet` files or directories of records
`{"query", "positive", "negatives": [...]}`, one dataset per file; every batch comes from one dataset.
`data.seq_len` is the maximum length of every text (longer ones are truncated and counted).
`evals.retrieval.data=BEIR_DIR` scores retrieval on a BEIR split every `evals.retrieval.every` steps.

Media: `tiny-image` (a tiny random Qwen3-VL on scikit-image's photographs ↔ captions) and `tiny-audio` (a tiny
random Qwen3-ASR on espeak-ng sentences ↔ transcripts) run offline in minutes; `qwen3-vl-2b` is the paper-size
image–text run (§6's vision specialist and Omni's image data: Qwen3-VL-2B or a merge of it with the encoder
as `model.init_from`, `data.path` = records `{"query": caption, "positive": {"image": path}}`). The paper gives
no image–text batch or budget: it takes the text runs' 512 pairs, Qwen3-1.7B's learning rate and chunking,
0 hard negatives (App. E), and a training pixel budget of 256 merged tokens (256·32·32 pixels) so a caption
and its image fit 512 tokens; towers frozen (`contrastive.train_towers`). `tiny-omni` trains a tiny random
Omni model on the mixture offline (standard-library text pairs, photographs, espeak-ng speech at 65 / 17.5 /
17.5 %); `omni-2.5b` is BidirLM-Omni's run (App. E: 1.8M pairs, one epoch at batch 512, 7 hard negatives
for text, 0 for media, towers frozen; learning rate and chunking as Qwen3-1.7B's, where the paper is silent)
from the composed model, `data.path` holding text, image and audio pair files and `data.weights` their shares.

Presets: `tiny` (the tiny Gemma3-shaped model on pairs mined from the standard library's docstrings)
and the paper's four sizes (paper-recipe.md §3.2): learning rates 6e-5 / 3e-5 / 1e-4 / 1e-4, batch 512,
GradCache chunks of 64 / 32 / 32 / 16 rows per data-parallel shard, 7 hard negatives, length 512, 500
warmup steps then a linear decay, τ = 0.05, AdamW (β2 0.95, ε 1e-5, weight decay 0.1), clip 1.0, seed 42,
3M pairs (5,859 steps), negatives gathered over the whole mesh (`contrastive.gather="local"` reproduces
sentence-transformers' per-device batches, which BidirLM probably used).
"""

from ml_collections import ConfigDict

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.train.config import base_config

_SIZES = {"gemma3-270m": (6e-5, 64), "qwen3-0.6b": (3e-5, 32), "gemma3-1b": (1e-4, 32), "qwen3-1.7b": (1e-4, 16)}
_MEDIA = ("tiny-image", "tiny-audio", "tiny-omni", "qwen3-vl-2b", "omni-2.5b")
# BidirLM-Omni's contrastive mixture (App. E): 65 % text–text, 17.5 % image–text, 17.5 % audio–text.
OMNI_MIX = "summaries:0.325;halves:0.325;sample_images:0.175;spoken:0.175"
PRESETS = ("tiny", *_SIZES, *_MEDIA)


def get_config(preset: str = "tiny") -> ConfigDict:
    c = base_config()
    c.objective = "contrastive"
    c.model.update(attention="bidirectional", bidirectional_window="half")
    c.data.update(source="pairs", weights="", seq_len=512)
    c.contrastive = ConfigDict(
        dict(
            temperature=0.05,
            chunk_size=0,  # GradCache rows per data-parallel shard per chunk; 0 = plain backprop
            pack=True,  # GradCache chunks pack several texts per row (no padding FLOPs); False: one per row
            pooling="mean",  # mean (BidirLM) | last | first
            gather="global",  # negatives from the whole mesh | local: per data-parallel shard
            num_negatives=7,  # hard negatives per query (each record must have at least this many)
            instructions="",  # JSON file {dataset: {"instruction": ..., "symmetric": bool}}
            mask_duplicates=False,  # drop candidates identical to a query's positive (repeated texts in a batch)
            # Media (model.towers): the prompt template, the training pixel budget (0: the checkpoint's
            # preprocessor_config.json), the longest clip kept (mteb's 30 s), and whether the towers train.
            template="chat",
            max_pixels=0,
            max_seconds=30.0,
            train_towers=False,
        )
    )
    c.evals.retrieval = ConfigDict(
        dict(
            kind="retrieval",
            data="",  # a BEIR directory scored during training: eval/ndcg_at_10, eval/mrr_at_10, ... ("": off)
            split="test",
            every=0,  # steps between evaluations (0: the last step only)
            instruction="",  # on the queries, as training instructs them
            batch_size=32,
            best_metric="",  # e.g. ndcg_at_10: keep the best step in RUN/best/
        )
    )
    c.optim.update(schedule="linear", b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, grad_clip_norm=1.0)
    if preset == "tiny":
        c.model.preset = "tiny-gemma3"
        c.data.update(source="stdlib", seq_len=128, global_batch_size=16)
        c.contrastive.update(num_negatives=1, chunk_size=4)
        c.optim.update(learning_rate=3e-3, warmup_steps=5, weight_decay=0.0)
        c.train.update(steps=80, checkpoint_every=40, log_every=5)
    elif preset in ("tiny-image", "tiny-audio"):
        image = preset == "tiny-image"
        c.model.update(preset="tiny-qwen3-vl" if image else "tiny-qwen3-asr", towers=True)
        c.data.update(source="sample_images" if image else "spoken", seq_len=64, global_batch_size=8)
        c.contrastive.update(num_negatives=0, chunk_size=4, max_pixels=128 * 128, max_seconds=4.0)
        c.optim.update(learning_rate=2e-3, warmup_steps=5, weight_decay=0.0)
        c.train.update(steps=60, checkpoint_every=30, log_every=5)
        if not image:  # eight sentences, six renderings each: a batch repeats transcripts, and the random
            # tower must learn to hear (a frozen random AuT passes too little of the clip through)
            c.contrastive.update(mask_duplicates=True, train_towers=True)
            c.optim.learning_rate = 5e-3
            c.train.update(steps=160, checkpoint_every=80)
    elif preset == "tiny-omni":
        c.model.update(preset="tiny-omni", towers=True)
        c.data.update(source="omni_mix", weights=OMNI_MIX, seq_len=96, global_batch_size=8)
        c.contrastive.update(num_negatives=1, chunk_size=4, max_pixels=128 * 128, max_seconds=4.0)
        c.optim.update(learning_rate=2e-3, warmup_steps=5, weight_decay=0.0)
        c.train.update(steps=40, checkpoint_every=20, log_every=5)
    elif preset == "omni-2.5b":  # model.init_from: the composed Omni (bidirlm merge --compose-omni)
        lr, chunk = _SIZES["qwen3-1.7b"]
        c.model.update(towers=True, dtype="bfloat16", remat="full", scan_layers=True)
        c.data.update(global_batch_size=512, seed=42)  # data.path: text, image and audio pair files; data.weights
        c.contrastive.update(num_negatives=7, chunk_size=chunk, max_pixels=256 * 32 * 32)
        c.optim.update(learning_rate=lr, warmup_steps=500, final_lr_fraction=0.0)
        c.train.update(steps=3516, seed=42, checkpoint_every=500, log_every=10)  # 1.8M pairs / 512
        c.mesh.update(data=-1, fsdp=1, tensor=1)
    elif preset == "qwen3-vl-2b":
        lr, chunk = _SIZES["qwen3-1.7b"]
        c.model.update(towers=True, dtype="bfloat16", remat="full", scan_layers=True)
        c.data.update(global_batch_size=512, seed=42)
        c.contrastive.update(num_negatives=0, chunk_size=chunk, max_pixels=256 * 32 * 32)
        c.optim.update(learning_rate=lr, warmup_steps=500, final_lr_fraction=0.0)
        c.train.update(steps=1000, seed=42, checkpoint_every=250, log_every=10)
        c.mesh.update(data=-1, fsdp=1, tensor=1)
    elif preset in _SIZES:
        lr, chunk = _SIZES[preset]
        # scanned: GradCache's compiled memory at 512 x 8 x 512 is 7.8 GiB, 52.6 GiB unrolled (BENCHMARKS.md)
        c.model.update(preset=preset, dtype="bfloat16", remat="full", scan_layers=True)
        c.data.update(global_batch_size=512, seed=42)
        c.contrastive.chunk_size = chunk
        c.optim.update(learning_rate=lr, warmup_steps=500, final_lr_fraction=0.0)
        c.train.update(steps=5859, seed=42, checkpoint_every=500, log_every=10)
        c.mesh.update(data=-1, fsdp=1, tensor=1)
    else:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return c
