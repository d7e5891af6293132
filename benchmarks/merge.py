"""Merge bandwidth: `bidirlm merge` against mergekit's linear merge and a plain copy, on one machine.

Two random bf16 checkpoints of the Qwen3-0.6B shape (596M parameters, tied embeddings, 1.19 GB each)
are generated once under `benchmarks/out/merge/` and merged at 0.5/0.5 by
  - `bidirlm merge` (this project, CPU),
  - `mergekit-yaml` with `merge_method: linear`, `dtype: bfloat16` (CPU, its defaults otherwise),
  - a copy that reads both inputs and writes one of them: the disk/page-cache bandwidth limit.
Each run is a fresh process started by a bare launcher (a forked child's peak RSS starts at its
parent's, so the parent must stay small); wall time and peak RSS (`wait4`'s ru_maxrss, the process
and its children) are measured from outside. GB/s counts bytes read plus bytes written. The page
cache is warm (inputs read once beforehand) and dirty pages are synced before every run, so the
figures measure the tools rather than the disk. Runs are interleaved (order alternating per round) and repeated; medians
reported, ratios and the load through `measure.Bench`.

    python benchmarks/merge.py [--repeats 3]   (the inputs are generated on the first run)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from measure import Bench

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bidirlm_jax.io.shards import ShardReader, ShardWriter, TensorSpec  # noqa: E402

BIN = Path(sys.executable).parent
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

LAUNCH = """
import json, os, sys, time
start = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall": time.perf_counter() - start, "rss": usage.ru_maxrss * 1024, "status": status}))
"""

COPY = """
import sys
a, b, out = sys.argv[1:4]
buf_a, buf_b = bytearray(64 << 20), bytearray(64 << 20)
with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb, open(out, "wb", buffering=0) as fo:
    while True:
        n = fa.readinto(buf_a)
        fb.readinto(buf_b)
        if not n:
            break
        fo.write(memoryview(buf_a)[:n])
"""


def qwen3_specs(config: dict) -> list[TensorSpec]:
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    d, h, kv, hd, ff = (
        config[k]
        for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    )
    specs = [TensorSpec("model.embed_tokens.weight", (config["vocab_size"], d), bf16)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (d,), bf16),
            TensorSpec(p + "self_attn.q_proj.weight", (h * hd, d), bf16),
            TensorSpec(p + "self_attn.k_proj.weight", (kv * hd, d), bf16),
            TensorSpec(p + "self_attn.v_proj.weight", (kv * hd, d), bf16),
            TensorSpec(p + "self_attn.o_proj.weight", (d, h * hd), bf16),
            TensorSpec(p + "self_attn.q_norm.weight", (hd,), bf16),
            TensorSpec(p + "self_attn.k_norm.weight", (hd,), bf16),
            TensorSpec(p + "post_attention_layernorm.weight", (d,), bf16),
            TensorSpec(p + "mlp.gate_proj.weight", (ff, d), bf16),
            TensorSpec(p + "mlp.up_proj.weight", (ff, d), bf16),
            TensorSpec(p + "mlp.down_proj.weight", (d, ff), bf16),
        ]
    return specs + [TensorSpec("model.norm.weight", (d,), bf16)]


def generate(path: Path, seed: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = qwen3_specs(QWEN3_0_6B)
    writer = ShardWriter(tmp, specs)
    rng = np.random.default_rng(seed)
    for spec in specs:
        writer.write(spec.name, (0.02 * rng.standard_normal(spec.shape, dtype=np.float32)).astype(spec.dtype))
    writer.close()
    (tmp / "config.json").write_text(json.dumps(QWEN3_0_6B, indent=2))
    tmp.rename(path)


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one fresh process (its children included)."""
    os.sync()
    done = subprocess.run([str(BIN / "python"), "-S", "-c", LAUNCH, *cmd], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"{cmd[0]} failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["status"] != 0:
        raise SystemExit(f"{cmd[0]} failed: {done.stderr[-2000:]}")
    return result["wall"], result["rss"] / 1e9


def compare(ours: Path, theirs: Path) -> tuple[float, float]:
    """Fraction of bit-identical elements and largest absolute difference between two merges."""
    a, b = ShardReader(ours), ShardReader(theirs)
    assert set(a.keys()) == set(b.keys()), set(a.keys()) ^ set(b.keys())
    same = total = 0
    worst = 0.0
    for key in a.keys():
        x, y = a.read_flat(key), b.read_flat(key)
        same += int(np.sum(x.view(np.uint16) == y.view(np.uint16)))
        total += x.size
        worst = max(worst, float(np.max(np.abs(x.astype(np.float32) - y.astype(np.float32)))))
    return same / total, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out" / "merge")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "merge.json"))
    parser.add_argument("--generate", nargs=2, metavar=("DIR", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        return generate(Path(args.generate[0]), int(args.generate[1]))
    work = args.workdir
    a, b = work / "a", work / "b"
    for path, seed in ((a, 0), (b, 1)):  # in a child, so that this process stays small (see `measure`)
        if not (path / "model.safetensors").is_file():
            subprocess.run([str(BIN / "python"), __file__, "--generate", str(path), str(seed)], check=True)
    size = (a / "model.safetensors").stat().st_size
    largest = max(s.nbytes for s in qwen3_specs(QWEN3_0_6B))
    for path in (a, b):  # warm the page cache
        subprocess.run(["cat", str(path / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)
    recipe = work / "linear.yml"
    recipe.write_text(
        f"merge_method: linear\ndtype: bfloat16\nmodels:\n"
        f"  - model: {a}\n    parameters:\n      weight: 0.5\n  - model: {b}\n    parameters:\n      weight: 0.5\n"
    )
    outs = {
        "bidirlm merge": work / "out-bidirlm",
        "mergekit linear": work / "out-mergekit",
        "copy (read 2, write 1)": work / "out-copy",
    }
    commands = {
        "bidirlm merge": [
            str(BIN / "bidirlm"),
            "merge",
            "--model",
            f"{a}=0.5",
            "--model",
            f"{b}=0.5",
            "--out",
            str(outs["bidirlm merge"]),
            "--no-progress",
        ],
        "mergekit linear": [
            str(BIN / "mergekit-yaml"),
            str(recipe),
            str(outs["mergekit linear"]),
            "--no-copy-tokenizer",
            "--no-write-model-card",
            "--quiet",
        ],
        "copy (read 2, write 1)": [
            str(BIN / "python"),
            "-c",
            COPY,
            str(a / "model.safetensors"),
            str(b / "model.safetensors"),
            str(work / "out-copy.safetensors"),
        ],
    }
    results = {name: [] for name in commands}

    def run(name: str) -> None:
        shutil.rmtree(outs[name], ignore_errors=True)
        (work / "out-copy.safetensors").unlink(missing_ok=True)
        results[name].append(measure(commands[name]))

    bench = Bench()
    bench.rounds({name: functools.partial(run, name) for name in commands}, args.repeats)
    bench.show_ratio("bidirlm merge", "mergekit linear")
    bench.show_ratio("bidirlm merge", "copy (read 2, write 1)")
    identical, worst = compare(outs["bidirlm merge"], outs["mergekit linear"])
    moved = 3 * size / 1e9
    print(
        f"inputs: 2 x {size / 1e9:.2f} GB bf16 (Qwen3-0.6B shape), largest tensor {largest / 1e9:.3f} GB; "
        f"median of {args.repeats} runs (wall and peak RSS from wait4 in the launcher), warm page cache\n"
    )
    print("| run | wall (s) | GB/s (read+write) | peak RSS (GB) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        print(f"<!-- {name}: " + ", ".join(f"{w:.2f}s/{r:.2f}GB" for w, r in runs) + " -->")
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        rss = max(r for _, r in runs)
        print(f"| {name} | {wall:.2f} | {moved / wall:.2f} | {rss:.2f} |")
    ours, theirs = (
        statistics.median(w for w, _ in results["bidirlm merge"]),
        statistics.median(w for w, _ in results["mergekit linear"]),
    )
    print(
        f"\nspeed-up over mergekit: {theirs / ours:.1f}x (target >= 3x); "
        f"RSS target: largest tensor x 3 + 300 MB = {(3 * largest + 300e6) / 1e9:.2f} GB"
    )
    print(f"bidirlm vs mergekit output: {identical:.6%} of elements bit-identical, max |diff| {worst:.3g}")
    bench.finish(args.out, dict(launcher=results, identical=identical, max_abs_diff=worst))


if __name__ == "__main__":
    main()
