"""One short run on a lent accelerator: kernel numerics, the Qwen3-1.7B MNTP step, and PyTorch's step.

1. Numerics: every attention kernel this platform has (GPU: cuDNN, Triton; TPU: splash; CPU: blocked)
   and the XLA ones, for each band (causal, causal sliding, bidirectional global, Gemma3 "half") and
   each kind of batch (no padding, right padding, packed documents with padding), against the fp32
   reference on the same bf16 inputs: largest error of the outputs and of dq/dk/dv on real tokens,
   relative to the reference's largest value (a refused case says why).
2. The MNTP training step (engine step: forward, backward, clipping, AdamW; sparse head, bf16 compute,
   fp32 state, scanned layers) of Qwen3-1.7B at 8192 tokens, random init, packed synthetic rows:
   tokens/s, MFU (the engine's model FLOPs, `mntp_flops_per_step`: the LM head on the sparse head's
   slots only, ÷ time ÷ the chip's peak bf16) and peak device memory.
3. The same step in PyTorch (transformers' Qwen3, bidirectional, best attention on the card:
   flash-attention 2 if installed, else sdpa; bf16 autocast over fp32 weights, AdamW; one document per
   row), if torch has CUDA.
4. Packed text batches (issue 24: several texts per row, segment ids, per-text positions) against the
   padded path on this platform's kernels, fp32 (`--packed-model`, random init, mixed lengths): `encode`'s
   pooled embeddings (`data.batching.packed_batches`) and the GradCache contrastive loss and gradients
   (`train.gradcache`, packed on device): largest difference relative to the padded result's largest
   value, the time of each, and the padded tokens each computes.
5. The media towers (Qwen3-VL vision tower, AuT audio encoder; fp32) against transformers on the same weights,
   and items/s of each; 6. the BidirLM-Omni contrastive step on a text, an image and an audio batch
   (`gpu_media.py`; `--omni-batch` pairs, `--skip-media` leaves both out).

`--smoke` runs all of it in seconds on a tiny model and short rows (any machine, CPU included).

    .venv/bin/python benchmarks/gpu_check.py [--smoke] [--seq 8192] [--steps 5] [--model qwen3-1.7b]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from attention import PLATFORM_KERNELS, inputs
from gpu_media import audio_numerics, omni_steps, relative, run_step, vision_numerics

from bidirlm_jax.data.batching import bucket_lengths, packed_batches, pad_batch
from bidirlm_jax.io.hf_config import config_to_hf
from bidirlm_jax.kernels.attention import KERNELS, Case, Options, refusal
from bidirlm_jax.kernels.masks import MaskSpec, Segments
from bidirlm_jax.losses.mntp import capacity, make_mntp_loss
from bidirlm_jax.models.encoder import pooled_embeddings
from bidirlm_jax.models.presets import get_preset
from bidirlm_jax.models.runtime import REMAT_POLICIES, Runtime
from bidirlm_jax.models.transformer import Transformer
from bidirlm_jax.sharding import make_mesh
from bidirlm_jax.train.config import base_config
from bidirlm_jax.train.gradcache import contrastive_loss_and_grads
from bidirlm_jax.train.metrics import peak_flops_per_device
from bidirlm_jax.train.objectives.base import token_sum_grads
from bidirlm_jax.train.objectives.mntp import mntp_flops_per_step
from bidirlm_jax.train.optim import make_optimizer
from bidirlm_jax.train.state import StateLayout
from bidirlm_jax.train.step import jit_step, make_step_fn

RATIO, MASK_ID = 0.3, 151_663
BANDS = {"causal": MaskSpec(None, 0), "causal-sliding": MaskSpec(511, 0), "bidirectional": MaskSpec(None, None),
         "half-window": MaskSpec(256, 256)}  # fmt: skip


def batches(kind: str, b: int, t: int) -> Segments:
    valid = np.ones((b, t), np.int32)
    if kind == "none":
        return Segments.of(None, None, (b, t))
    valid[:, t - t // 8 :] = 0
    if kind == "right-padded":
        return Segments.of(valid, None, (b, t))
    ids = np.where(np.arange(t) < 2 * t // 5, 1, 2)[None].repeat(b, 0) * valid
    return Segments.of(valid, ids.astype(np.int32), (b, t))


def _outputs_and_grads(kernel: str, spec: MaskSpec, segments: Segments, scale: float, q, k, v) -> list[np.ndarray]:
    """Outputs on real tokens and dq, dk, dv of a random weighting of them, through `kernel`."""
    weights = jax.random.normal(jax.random.PRNGKey(1), q.shape) * segments.valid[:, :, None, None]

    def loss(q, k, v):
        out = KERNELS[kernel](q, k, v, spec, segments, Options(scale, 512, 512)).astype(jnp.float32)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(out)[np.asarray(segments.valid)], *(np.asarray(g, np.float32) for g in grads)]


def kernel_numerics(kernels: list[str], t: int, shape=(16, 8, 128), b: int = 2) -> list[dict]:
    q, k, v = inputs(shape, t, b, jnp.bfloat16)
    scale = shape[2] ** -0.5
    rows = []
    for band, spec in BANDS.items():
        for kind in ("none", "right-padded", "packed"):
            segments = batches(kind, b, t)
            ref = _outputs_and_grads("reference", spec, segments, scale, *(x.astype(jnp.float32) for x in (q, k, v)))
            for kernel in kernels:
                case = Case.of(q, k, spec, segments, Options(scale, 512, 512))
                why = refusal(kernel, case, jax.default_backend())
                row = dict(band=band, batch=kind, kernel=kernel)
                if why:
                    rows.append(dict(row, skipped=why))
                    continue
                got = _outputs_and_grads(kernel, spec, segments, scale, q, k, v)
                errs = [float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-30)) for a, r in zip(got, ref)]
                rows.append(dict(row, out=errs[0], grads=max(errs[1:])))
    return rows


def synthetic_packed(rng: np.random.Generator, b: int, t: int, vocab: int) -> dict[str, np.ndarray]:
    """Rows of documents of random lengths (mean ~t/4), positions restarting, the last piece padded."""
    rows = {k: np.zeros((b, t), np.int32) for k in ("input_ids", "segment_ids", "positions", "attention_mask")}
    for r in range(b):
        start, seg = 0, 1
        while start < t - t // 16:
            n = min(int(rng.integers(t // 8, t // 2)), t - start)
            rows["input_ids"][r, start : start + n] = rng.integers(10, vocab, n)
            rows["segment_ids"][r, start : start + n] = seg
            rows["positions"][r, start : start + n] = np.arange(n)
            start, seg = start + n, seg + 1
        rows["attention_mask"][r, :start] = 1
    rows["maskable"] = (rows["attention_mask"] > 0) & (rows["positions"] > 0)
    return rows


def jax_mntp(config, runtime, t: int, b: int, steps: int) -> dict:
    optim = base_config().optim
    tx, schedule = make_optimizer(optim, total_steps=1000)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    layout = StateLayout(config, tx, mesh, seed=0, runtime=runtime)
    loss = make_mntp_loss(mask_id=min(MASK_ID, config.vocab_size - 1), ratio=RATIO, vocab_size=config.vocab_size)
    batch = synthetic_packed(np.random.default_rng(0), b, t, config.vocab_size)
    step = jit_step(make_step_fn(layout.graphdef, token_sum_grads(loss), tx, schedule), layout.shardings, mesh)
    r = run_step(step, layout, batch, batch, mesh, steps)
    seconds = r["step_s"]
    tokens = b * t
    peak_flops = peak_flops_per_device(jax.devices()[0].device_kind)
    flops = mntp_flops_per_step(config, t, b, capacity(t, RATIO, 1.2), runtime=runtime)
    mfu = flops / seconds / peak_flops if peak_flops else None
    return dict(step_s=seconds, tokens_per_s=tokens / seconds, mfu=mfu, peak_gb=r["peak_gb"],
                compile_s=r["compile_s"], loss=r["last_loss"])  # fmt: skip


def torch_mntp(config, runtime, t: int, b: int, steps: int, smoke: bool) -> dict:
    try:
        import torch
        import transformers
    except ImportError as e:
        return {"skipped": f"no torch/transformers ({e})"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not smoke:
        return {"skipped": "torch has no CUDA here"}
    hf = {k: v for k, v in config_to_hf(config, runtime).items() if k != "architectures"}
    try:
        import flash_attn  # noqa: F401

        attn = "flash_attention_2"
    except ImportError:
        attn = "sdpa"
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf, attn_implementation=attn)).to(device)
    model.config.is_causal = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(10, config.vocab_size, (b, t)), device=device)
    masked = torch.as_tensor(rng.random((b, t)) < RATIO, device=device)
    masked[:, 0] = False
    corrupted = torch.where(masked, min(MASK_ID, config.vocab_size - 1), ids)
    dtype = torch.bfloat16

    def step() -> float:
        with torch.autocast(device, dtype=dtype):
            hidden = model.model(input_ids=corrupted, is_causal=False).last_hidden_state
            predicts = masked[:, 1:]  # position j predicts the masked token j + 1 (shifted once)
            logits = model.lm_head(hidden[:, :-1][predicts])
            loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][predicts])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak_flops = peak_flops_per_device(name) or peak_flops_per_device(f"NVIDIA {name}")
    flops = mntp_flops_per_step(config, t, b, capacity(t, RATIO, 1.2), runtime=runtime)  # the same count as ours
    mfu = flops / seconds / peak_flops if peak_flops else None
    return dict(step_s=seconds, tokens_per_s=b * t / seconds, mfu=mfu, peak_gb=peak, attention=attn, loss=loss,
                torch=torch.__version__)  # fmt: skip


def _timed(fn, *args, repeats: int = 3, **kwargs):
    """(result, best seconds of `repeats` calls after a warm-up call)."""
    out = jax.block_until_ready(fn(*args, **kwargs))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        best = min(best, time.perf_counter() - start)
    return out, best


def packed_paths(name: str, texts: int, max_len: int, rows: int, chunk: int) -> dict:
    """Section 4: packed vs padded `encode` embeddings and GradCache step, fp32, mixed lengths 4..max_len."""
    from flax import nnx

    config = get_preset(name)
    model = Transformer(config, Runtime(attention="bidirectional"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(10, config.vocab_size, int(n)).tolist() for n in rng.integers(4, max_len + 1, texts)]
    buckets = bucket_lengths(max_len)

    @functools.partial(jax.jit, static_argnames="num_texts")
    def embed(state, inputs, num_texts=None):
        return pooled_embeddings(nnx.merge(graphdef, state), inputs, "mean", num_texts=num_texts)

    def run_packed(state):
        out = np.zeros((texts, config.hidden_size), np.float32)
        for b in packed_batches(seqs, rows=rows, buckets=buckets, pad=0):
            out[b.texts] = np.asarray(embed(state, b.inputs, num_texts=b.num_texts))[: len(b.texts)]
        return out

    def run_padded(state):
        out = np.zeros((texts, config.hidden_size), np.float32)
        order = sorted(range(texts), key=lambda i: -len(seqs[i]))
        for lo in range(0, texts, rows):
            index = order[lo : lo + rows]
            ids, mask = pad_batch([seqs[i] for i in index], rows, buckets, 0)
            out[index] = np.asarray(embed(state, {"input_ids": ids, "attention_mask": mask}))[: len(index)]
        return out

    packed, packed_s = _timed(run_packed, state)
    padded, padded_s = _timed(run_padded, state)
    real = sum(map(len, seqs))
    packed_tokens = sum(b.inputs["input_ids"].size for b in packed_batches(seqs, rows=rows, buckets=buckets, pad=0))
    result = {"encode": dict(rel_diff=relative(packed, padded), packed_s=packed_s, padded_s=padded_s,
                             real_tokens=real, packed_tokens=packed_tokens)}  # fmt: skip

    b = 2 * rows  # queries; one positive and one negative each, texts of mixed lengths padded to max_len
    batch = {}
    for role, shape in (("query", (b,)), ("positive", (b,)), ("negative", (b, 1))):
        lengths = rng.integers(4, max_len + 1, shape)
        batch[f"{role}_ids"] = rng.integers(10, config.vocab_size, (*shape, max_len)).astype(np.int32)
        batch[f"{role}_mask"] = (np.arange(max_len) < lengths[..., None]).astype(np.int32)
    step = jax.jit(contrastive_loss_and_grads, static_argnums=0, static_argnames=("chunk_size", "pack"))
    (loss_p, grads_p, _), packed_s = _timed(step, graphdef, state, batch, chunk_size=chunk, pack=True)
    (loss_u, grads_u, _), padded_s = _timed(step, graphdef, state, batch, chunk_size=chunk, pack=False)
    grad_diff = max(relative(a, c) for a, c in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_u)))
    result["gradcache"] = dict(loss_diff=abs(float(loss_p) - float(loss_u)), grad_rel_diff=grad_diff,
                               packed_s=packed_s, padded_s=padded_s)  # fmt: skip
    return result


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, short rows: seconds on any machine")
    parser.add_argument("--model", default="qwen3-1.7b")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", default="save_dots", choices=REMAT_POLICIES)
    parser.add_argument("--numerics-len", type=int, default=1024)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--packed-model", default="bench-qwen3", help="section 4's model (fp32)")
    parser.add_argument("--omni-batch", type=int, default=32, help="section 6's pairs per step (the paper's: 512)")
    parser.add_argument("--skip-media", action="store_true", help="leave out sections 5 and 6")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "gpu_check.json"))
    args = parser.parse_args()
    platform = jax.default_backend()
    name, t, numerics_len, steps = args.model, args.seq, args.numerics_len, args.steps
    if args.smoke:
        name, t, numerics_len, steps = "tiny-qwen3", 256, 128, 2
    kernels = PLATFORM_KERNELS.get(platform, []) + ["chunked", "xla"] + (["triton"] if args.smoke else [])
    device = jax.devices()[0].device_kind
    print(f"device: {device} ({platform}, {jax.device_count()} devices), jax {jax.__version__}")

    print(f"\n1. kernel numerics at T={numerics_len}, bf16 inputs vs fp32 reference (max error / max |reference|)")
    numerics = kernel_numerics(kernels, numerics_len, shape=(4, 2, 32) if args.smoke else (16, 8, 128))
    print(f"{'band':<16}{'batch':<14}{'kernel':<9}{'out':>10}{'grads':>10}")
    for r in numerics:
        figures = f"{r['out']:>10.2e}{r['grads']:>10.2e}" if "out" in r else f"  refused: {r['skipped'][:70]}"
        print(f"{r['band']:<16}{r['batch']:<14}{r['kernel']:<9}{figures}")

    config = get_preset(name)
    runtime = Runtime(attention="bidirectional", dtype="bfloat16", remat=args.remat, scan_layers=True)
    print(f"\n2./3. MNTP step, {name}, batch {args.batch} x {t} tokens, bf16 compute, remat {args.remat}")
    results = {"jax": jax_mntp(config, runtime, t, args.batch, steps)}
    if not args.skip_torch:
        results["torch"] = torch_mntp(config, runtime, t, args.batch, steps, args.smoke)
    print(f"{'stack':<8}{'s/step':>9}{'tokens/s':>11}{'MFU':>7}{'peak GB':>9}  notes")
    for stack, r in results.items():
        if "skipped" in r:
            print(f"{stack:<8}  skipped: {r['skipped']}")
            continue
        mfu = _fmt(None if r["mfu"] is None else 100 * r["mfu"], ".1f")
        notes = f"loss {r['loss']:.3f}" + (f", {r['attention']}, torch {r['torch']}" if stack == "torch" else
                                           f", compile {r['compile_s']:.0f} s")  # fmt: skip
        print(
            f"{stack:<8}{r['step_s']:>9.3f}{r['tokens_per_s']:>11,.0f}{mfu:>7}{_fmt(r['peak_gb'], '.1f'):>9}  {notes}"
        )

    packed_model = "tiny-qwen3" if args.smoke else args.packed_model
    shape = (
        dict(texts=64, max_len=64, rows=8, chunk=4) if args.smoke else dict(texts=512, max_len=512, rows=32, chunk=16)
    )
    print(f"\n4. packed vs padded text batches, {packed_model}, fp32, {shape}")
    packed = packed_paths(packed_model, **shape)
    e, g = packed["encode"], packed["gradcache"]
    print(f"encode:    rel diff {e['rel_diff']:.1e}, packed {e['packed_s']:.3f} s, padded {e['padded_s']:.3f} s, "
          f"{e['real_tokens']:,} real tokens in {e['packed_tokens']:,} packed")  # fmt: skip
    print(f"gradcache: loss diff {g['loss_diff']:.1e}, grads rel diff {g['grad_rel_diff']:.1e}, "
          f"packed {g['packed_s']:.3f} s, padded {g['padded_s']:.3f} s")  # fmt: skip
    media = {} if args.skip_media else media_sections(args.smoke, args.omni_batch, steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(dict(device=device, numerics=numerics, steps=results, packed=packed, **media), indent=2)
    )


def media_sections(smoke: bool, omni_batch: int, steps: int) -> dict:
    """Sections 5 and 6 (`gpu_media.py`), printed; their figures for the JSON."""
    depth = 1 if smoke else 4
    print(f"\n5. media towers, {depth} block(s), fp32: ours vs transformers (max error / max |reference|), items/s")
    towers = {
        "vision": vision_numerics(depth, images=2 if smoke else 8, size=64 if smoke else 448),
        "audio": audio_numerics(depth, count=2 if smoke else 8, max_seconds=3.0 if smoke else 20.0),
    }
    for tower, r in towers.items():
        print(f"{tower:<8} error {r['error']:.1e}, ours {r['ours_per_s']:,.1f}/s, transformers ({r['torch']}) "
              f"{r['theirs_per_s']:,.1f}/s over {r['items']} items")  # fmt: skip
    batch = 2 if smoke else omni_batch
    print(
        f"\n6. Omni contrastive step ({'tiny-omni, fp32' if smoke else 'omni-2.5b, bf16, remat full'}), {batch} pairs"
    )
    omni = omni_steps(smoke=smoke, batch=batch, steps=steps)
    print(f"{'batch':<8}{'s/step':>9}{'pairs/s':>9}{'peak GB':>9}  notes")
    for kind, r in omni.items():
        print(f"{kind:<8}{r['step_s']:>9.3f}{r['pairs_per_s']:>9.1f}{r['peak_gb']:>9.1f}  first loss {r['loss']:.3f}, "
              f"{r['negatives']} negatives, compile {r['compile_s']:.0f} s")  # fmt: skip
    return dict(media_towers=towers, omni_steps=omni)


if __name__ == "__main__":
    main()
