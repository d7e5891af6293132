"""Do our exports load right in transformers 4.x? Run: `.venv/bin/python tests/compat/transformers4.py`.

Builds tiny random Gemma3 and Qwen3 models here (transformers 5), exports them with bidirlm_jax, and
loads the exports in a separate virtual environment holding the last transformers 4.x release (created
on first use, reused after; `--venv` says where). Each export must give, in 4.x, the logits we expect:
causal exports the causal model's; bidirectional exports what 4.x makes of their flags (see README.md).
Exits 1 on a mismatch. Needs the package index pip is configured with (no other network).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRANSFORMERS = "4.57.6"  # the last 4.x release
TORCH = "2.13.0"
TOLERANCE = 1e-4

# Runs in the 4.x environment: logits of every export listed in the job file.
CHILD = """
import json, sys
import numpy as np, torch, transformers
jobs = json.load(open(sys.argv[1]))
print("transformers", transformers.__version__, "torch", torch.__version__, flush=True)
for job in jobs:
    data = np.load(job["inputs"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        job["export"], attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(data["ids"]), attention_mask=torch.as_tensor(data["mask"]))
    np.save(job["output"], out.logits.float().numpy())
"""


def ensure_venv(venv: Path) -> Path:
    """The 4.x environment's python, installing it when missing."""
    python = venv / "bin" / "python"
    stamp = venv / f".installed-transformers-{TRANSFORMERS}-torch-{TORCH}"
    if not stamp.exists():
        start = time.time()
        print(f"creating {venv} with transformers=={TRANSFORMERS} torch=={TORCH} (a few minutes, once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        packages = [f"transformers=={TRANSFORMERS}", f"torch=={TORCH}", "safetensors", "numpy"]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True, timeout=1800)
        stamp.touch()
        print(f"installed in {time.time() - start:.0f} s", flush=True)
    return python


def cases():
    """(name, source config, attention, window, which of our models 4.x must match)."""
    from bidirlm_jax.testing import reference

    gemma = reference.gemma3_config(
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 20_000.0},
        }
    )
    qwen = reference.qwen3_config(
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        use_sliding_window=True,
        sliding_window=reference.WINDOW,
        max_window_layers=1,
    )
    return [
        ("gemma3 causal", gemma, "causal", None, "causal"),
        ("qwen3 causal", qwen, "causal", None, "causal"),
        ("gemma3 bidirectional half", gemma, "bidirectional", "half", "bidirectional"),  # use_bidirectional_attention
        ("gemma3 bidirectional full", gemma, "bidirectional", "full", "causal"),  # is_causal=False is ignored
        ("qwen3 bidirectional full", qwen, "bidirectional", "full", "causal"),  # is_causal=False is ignored
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "bidirlm-compat-transformers4")
    args = parser.parse_args()
    python = ensure_venv(args.venv)

    import numpy as np

    import bidirlm_jax
    from bidirlm_jax.testing import reference

    work = Path(tempfile.mkdtemp(prefix="bidirlm-compat-"))
    ids, mask = reference.batch()
    np.savez(work / "inputs.npz", ids=ids, mask=mask)
    jobs, expected = [], {}
    for i, (name, config, attention, window, matches) in enumerate(cases()):
        src = reference.save(reference.build(config), work / f"src{i}")
        model = bidirlm_jax.from_pretrained(src, attention=attention, bidirectional_window=window)
        export = bidirlm_jax.save_pretrained(model, work / f"export{i}")
        expected[name] = np.asarray(reference.logits(bidirlm_jax.from_pretrained(src, attention=matches), ids, mask))
        jobs.append(
            {
                "name": name,
                "matches": matches,
                "export": str(export),
                "inputs": str(work / "inputs.npz"),
                "output": str(work / f"{i}.npy"),
            }
        )
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run(
        [str(python), "-c", CHILD, str(work / "jobs.json")],
        check=True,
        env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=1800,
    )
    failed = 0
    for job in jobs:
        err = reference.max_rel_err(expected[job["name"]], np.load(job["output"]), mask)
        ok = err < TOLERANCE
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {job['name']:28s} = our {job['matches']} model (max rel err {err:.1e})")
    print(f"exports and logits in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
