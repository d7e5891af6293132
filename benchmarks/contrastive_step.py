"""Contrastive training step: our GradCache step vs sentence-transformers' CachedMultipleNegativesRankingLoss.

Same model, same batch, same loss: a bidirectional `bench-qwen3` encoder (41.6M parameters, random weights saved by
transformers), mean pooling, cosine InfoNCE at temperature 0.05 (sentence-transformers' scale 20) over in-batch and
hard negatives, fp32, batch 32 queries x (1 positive + 1 hard negative), length 128 (texts of 64-128 real tokens,
right-padded), GradCache mini-batches of 8 rows. One step = the GradCache forward/backward, global grad-norm
clipping (1.0) and AdamW (β 0.9/0.95, ε 1e-8, weight decay 0.1 on matrices).

- Ours: the engine's jitted step (`make_step_fn` + `jit_step`) over `gradcache.contrastive_loss_and_grads(chunk_size=8)`
  and optax AdamW, one CPU device.
- Peer: a `SentenceTransformer` built from `models.Transformer` (the saved checkpoint, `is_causal=False` in its
  config) + `models.Pooling(mean)`, `CachedMultipleNegativesRankingLoss(mini_batch_size=8)` called on the
  already-tokenised features (no tokenisation in the step), `.backward()`, `torch.optim.AdamW`, eager, 2 threads.
- `--plain` adds both sides without GradCache (ours `chunk_size=None`, sentence-transformers'
  `MultipleNegativesRankingLoss`).

The step-0 losses must agree before anything is timed; then `--iters` interleaved rounds (best and median).

Memory (unless `--skip-memory`): XLA's compiled memory analysis of the whole step (`--gradient`: also of the
gradient alone), GradCache vs plain backprop, at the paper's batch (512 queries, 7 hard negatives, length 512) for
Qwen3-0.6B with the paper preset's run settings (bf16 compute, fp32 master weights, remat `full`, unrolled layers,
GradCache chunks of 32; `--memory-scan`: scanned layers), on abstract inputs (`jax.ShapeDtypeStruct`: nothing is allocated).

    .venv/bin/python benchmarks/contrastive_step.py [--iters 3] [--plain] [--skip-memory] [--skip-timing]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from measure import Bench
from peers import OPTIM, constant_optimizer, memory_row, torch_adamw

import bidirlm_jax
from bidirlm_jax.io.hf_config import config_to_hf
from bidirlm_jax.io.params import param_count
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.train.gradcache import contrastive_loss_and_grads
from bidirlm_jax.train.state import StateLayout
from bidirlm_jax.train.step import jit_step, make_step_fn

TEMPERATURE = 0.05


def save_reference(path: Path, layers: int) -> None:
    """Random bench-qwen3 weights (torch seed 0) saved by transformers, bidirectional in its config, with a
    word-level tokenizer so that sentence-transformers can load the directory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    config = get_preset("bench-qwen3")
    config = config.replace(num_layers=layers, layer_types=config.layer_types[:layers])
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(config, Runtime(attention="bidirectional"))))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w3")), unk_token="w3", pad_token="w0"
    )
    tokenizer.save_pretrained(path)


def make_batch(vocab: int, batch: int, negatives: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random texts of 64..length real tokens, right-padded to `length`."""
    rng = np.random.default_rng(seed)

    def texts(*shape):
        ids = rng.integers(5, vocab, (*shape, length)).astype(np.int32)
        real = rng.integers(length // 2, length + 1, shape)
        mask = (np.arange(length) < real[..., None]).astype(np.int32)
        return ids * mask, mask

    out = {}
    for name, shape in (("query", (batch,)), ("positive", (batch,)), ("negative", (batch, negatives))):
        out[f"{name}_ids"], out[f"{name}_mask"] = texts(*shape)
    return out


# --- ours ----------------------------------------------------------------------------------------------------


def _grad_fn(chunk_size: int | None, pack: bool = True):
    def grad_fn(graphdef, params, batch, rng):
        loss, grads, metrics = contrastive_loss_and_grads(
            graphdef,
            params,
            batch,
            rng,
            chunk_size=chunk_size,
            temperature=TEMPERATURE,
            pooling="mean",
            pack=pack,
        )
        metrics = dict(metrics)
        return loss, grads, metrics.pop("tokens"), metrics

    return grad_fn


def jax_step(path: Path, batch: dict, chunk_size: int | None, pack: bool = True):
    """(one-step callable, step-0 loss, compile seconds) of the engine's jitted contrastive step."""
    model = bidirlm_jax.from_pretrained(path, attention="bidirectional")
    tx, schedule = constant_optimizer()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = StateLayout(model.config, tx, mesh, seed=0, runtime=model.runtime)
    state = layout.from_params(nnx.state(model, nnx.Param))
    del model
    step = jit_step(make_step_fn(layout.graphdef, _grad_fn(chunk_size, pack), tx, schedule), layout.shardings, mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    holder = {}
    with jax.set_mesh(mesh):
        holder["state"], out = compiled(state, batch)

    def run():
        with jax.set_mesh(mesh):
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics)

    return run, float(out["loss"]), seconds


# --- sentence-transformers -----------------------------------------------------------------------------------


def st_step(path: Path, batch: dict, mini_batch: int | None):
    """(one-step callable, step-0 loss) of a SentenceTransformer (Transformer + mean Pooling) trained with
    CachedMultipleNegativesRankingLoss (`mini_batch` rows) or, for None, MultipleNegativesRankingLoss."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    body = Transformer(
        str(path), max_seq_length=batch["query_ids"].shape[-1], model_kwargs={"attn_implementation": "sdpa"}
    )
    pooling = Pooling(body.get_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[body, pooling], device="cpu").train()
    assert getattr(body.model.config, "is_causal", True) is False, "the peer must run bidirectionally"
    if mini_batch is None:
        loss_fn = MultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE)
    else:
        loss_fn = CachedMultipleNegativesRankingLoss(model, scale=1.0 / TEMPERATURE, mini_batch_size=mini_batch)
    params = list(model.parameters())
    opt = torch_adamw(params)

    def features(name: str, j: int | None = None) -> dict[str, torch.Tensor]:
        ids, mask = batch[f"{name}_ids"], batch[f"{name}_mask"]
        if j is not None:
            ids, mask = ids[:, j], mask[:, j]
        return {"input_ids": torch.as_tensor(ids, dtype=torch.long), "attention_mask": torch.as_tensor(mask)}

    k = batch["negative_ids"].shape[1]
    columns = [features("query"), features("positive")] + [features("negative", j) for j in range(k)]

    def run() -> float:
        # fresh dicts each step: modules may write into the features
        loss = loss_fn([dict(c) for c in columns], None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIM["grad_clip_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    loss = run()
    return run, loss


# --- runs ----------------------------------------------------------------------------------------------------


def timing(args, bench: Bench) -> dict:
    config = get_preset("bench-qwen3")
    config = config.replace(num_layers=args.layers, layer_types=config.layer_types[: args.layers])
    batch = make_batch(config.vocab_size, args.batch, args.negatives, args.length)
    texts = args.batch * (2 + args.negatives)
    print(
        f"bench-qwen3 encoder, {args.layers} layers ({param_count(config) / 1e6:.1f}M params), fp32, batch "
        f"{args.batch} x (1 + 1 + {args.negatives}) texts of length {args.length} "
        f"({int(sum(batch[k].sum() for k in batch if k.endswith('_mask')))} real tokens of {texts * args.length}), "
        f"mini-batch {args.mini_batch}"
    )
    variants, first, extra = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        save_reference(path, args.layers)
        pairs = [("gradcache", args.mini_batch)] + ([("plain", None)] if args.plain else [])
        for label, chunk in pairs:
            run, first[f"ours {label}"], seconds = jax_step(path, batch, chunk)
            variants[f"ours {label}"], extra[f"ours {label}"] = run, dict(compile_seconds=seconds)
            start = time.perf_counter()
            variants[f"st {label}"], first[f"st {label}"] = st_step(path, batch, chunk)
            extra[f"st {label}"] = dict(first_call_seconds=time.perf_counter() - start)
        if args.padded:  # GradCache over one padded text per row: what packing saves, in the same run
            run, first["ours gradcache padded"], seconds = jax_step(path, batch, args.mini_batch, pack=False)
            variants["ours gradcache padded"] = run
            extra["ours gradcache padded"] = dict(compile_seconds=seconds)
    for label, _ in pairs:
        ours, theirs = first[f"ours {label}"], first[f"st {label}"]
        rel = abs(ours - theirs) / abs(theirs)
        print(f"  step-0 loss ({label}): ours {ours:.6f}, sentence-transformers {theirs:.6f} (relative {rel:.1e})")
        assert rel < 1e-4, f"step-0 losses differ: {ours} vs {theirs}"
    rows = bench.rounds(variants, args.iters)
    for n, r in rows.items():
        r.update(loss=first[n], **extra[n])
    print(f"  {'step':<22}{'best s':>9}{'median s':>10}{'texts/s':>9}{'CPU s best':>12}{'CPU s median':>14}")
    for n, r in rows.items():
        print(
            f"  {n:<22}{r['best']:>9.2f}{r['median']:>10.2f}{texts / r['best']:>9.1f}"
            f"{r['cpu_best']:>12.2f}{r['cpu_median']:>14.2f}"
        )
    ratios = {f"st {label} / ours {label}": bench.show_ratio(f"ours {label}", f"st {label}") for label, _ in pairs}
    if args.padded:
        ratios["ours gradcache padded / ours gradcache"] = bench.show_ratio("ours gradcache", "ours gradcache padded")
    return dict(rows=rows, ratios=ratios, params=param_count(config))


def memory(args) -> dict:
    config = get_preset(args.memory_preset)
    runtime = Runtime(
        attention="bidirectional",
        dtype="bfloat16",
        remat="full",
        attention_impl=args.memory_attention,
        scan_layers=args.memory_scan,
    )
    if args.memory_layers:
        config = config.replace(num_layers=args.memory_layers, layer_types=config.layer_types[: args.memory_layers])
    b, k, length = args.memory_batch, 7, 512
    print(
        f"\nmemory: {args.memory_preset}{f' ({args.memory_layers} layers)' if args.memory_layers else ''}, bidirectional, "
        f"bf16 compute, fp32 master weights, remat full, {'scanned' if args.memory_scan else 'unrolled'} layers, "
        f"attention {args.memory_attention}; batch {b} x (1 + 1 + {k}) "
        f"x {length}; XLA memory analysis on abstract inputs"
    )
    logging.basicConfig(format="  %(message)s")  # which attention kernel "auto" takes
    logging.getLogger("bidirlm_jax.kernels.attention").setLevel(logging.INFO)
    tx, schedule = constant_optimizer()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = StateLayout(config, tx, mesh, seed=0, runtime=runtime)
    sds = jax.ShapeDtypeStruct
    batch = {
        "query_ids": sds((b, length), jnp.int32),
        "query_mask": sds((b, length), jnp.int32),
        "positive_ids": sds((b, length), jnp.int32),
        "positive_mask": sds((b, length), jnp.int32),
        "negative_ids": sds((b, k, length), jnp.int32),
        "negative_mask": sds((b, k, length), jnp.int32),
    }
    rows = {}
    for label, chunk in ((f"gradcache (chunk {args.memory_chunk})", args.memory_chunk), ("plain backprop", None)):
        grad_fn = _grad_fn(chunk)
        start = time.perf_counter()
        row = {}
        with jax.set_mesh(mesh):
            if args.gradient:
                lowered = jax.jit(grad_fn, static_argnums=0).lower(
                    layout.graphdef, layout.abstract.params, batch, sds((2,), jnp.uint32)
                )
                row["gradient"] = memory_row(lowered.compile().memory_analysis())
            step = jit_step(make_step_fn(layout.graphdef, grad_fn, tx, schedule), layout.shardings, mesh)
            row["step"] = memory_row(step.lower(layout.abstract, batch).compile().memory_analysis())
        row["seconds"] = time.perf_counter() - start
        rows[label] = row
        g, s = row.get("gradient"), row["step"]
        print(
            f"  {label:<20}"
            + (f" gradient temp {g['temp_gib']:8.2f} GiB;" if g else "")
            + f" step temp {s['temp_gib']:8.2f} GiB (arguments {s['argument_gib']:.2f}, outputs "
            f"{s['output_gib']:.2f}, aliased {s['alias_gib']:.2f} GiB); lowered+compiled in {row['seconds']:.0f} s"
        )
    return dict(
        rows=rows,
        preset=args.memory_preset,
        layers=config.num_layers,
        scan_layers=args.memory_scan,
        batch=b,
        negatives=k,
        length=length,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--mini-batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8, help="bench-qwen3 layers (8 = the preset)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="also time both sides without GradCache")
    parser.add_argument("--padded", action="store_true", help="also time our GradCache without packing")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the memory analysis at the paper's batch")
    parser.add_argument("--memory-preset", default="qwen3-0.6b")
    parser.add_argument("--memory-layers", type=int, default=0, help="cut the preset to this many layers (0: all)")
    parser.add_argument("--memory-batch", type=int, default=512)
    parser.add_argument("--memory-chunk", type=int, default=32)
    parser.add_argument("--memory-attention", default="auto", help="attention_impl for the memory analysis")
    parser.add_argument(
        "--memory-scan", action="store_true", help="scanned layers (the paper contrastive preset's are unrolled)"
    )
    parser.add_argument("--gradient", action="store_true", help="memory: also the gradient alone (no optimizer)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "contrastive_step.json"))
    parser.add_argument("--cores", type=int, default=0, help="pin the process to its first N allowed cores (0: all)")
    args = parser.parse_args()
    if args.cores:  # every thread of this process (any already started too) and every later one
        cores = sorted(os.sched_getaffinity(0))[: args.cores]
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), cores)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    bench = Bench(threads={"torch": torch.get_num_threads()})
    print(f"jax {jax.__version__}")
    results = {}
    if not args.skip_timing:
        results["timing"] = timing(args, bench)
    if not args.skip_memory:
        results["memory"] = memory(args)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    bench.finish(out, {**previous, **results})


if __name__ == "__main__":
    main()
