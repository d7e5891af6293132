"""`bidirlm demo`: the pipeline on tiny random models, offline, checked against transformers at each step.

First the training engine makes a small causal base model (`bidirlm_jax/configs/lm.py:tiny`, next-token
loss on a generated corpus). Then, for Gemma3 and Qwen3: build a random causal LM with transformers,
convert it to a bidirlm checkpoint, run it in both attention modes beside transformers' own forward in
the same mode, export it back as a bidirectional HF directory and reload that with plain
`AutoModelForCausalLM` (no remote code).

Everything is written into a temporary directory renamed into place at the end. The output carries a
marker file listing what the demo wrote, so `--overwrite` can replace a previous demo output and never
anything else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bidirlm_jax.errors import CheckpointError

TOLERANCE = 1e-4
MARKER = ".bidirlm-demo"  # JSON {"entries": [...]}: the names the demo wrote into its output directory


def check_output(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The resolved output directory, or a `CheckpointError` before any work when it must not be touched.

    A missing or empty directory is used; a previous demo output (marker present, nothing foreign added)
    only with `overwrite`; anything else never, since the demo replaces its output directory as a whole.
    """
    out = Path(out_dir).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise CheckpointError(f"--out {out_dir} is (or contains) the current directory; choose a new directory")
    if not out.exists():
        return out
    if not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; choose a directory")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return out
    if MARKER not in entries:
        raise CheckpointError(
            f"--out {out} exists and is not a `bidirlm demo` output; choose a new directory "
            "(--overwrite only replaces a previous demo output)"
        )
    if not overwrite:
        raise CheckpointError(f"--out {out} holds a previous demo output; pass --overwrite to replace it")
    try:
        written = set(json.loads((out / MARKER).read_text())["entries"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{out / MARKER} is unreadable ({e}); remove {out} yourself or choose another --out"
        ) from None
    if foreign := sorted(entries - written - {MARKER}):
        raise CheckpointError(
            f"--out {out} holds files the demo did not write ({', '.join(foreign)}); move them or choose another --out"
        )
    return out


def _train_base(out: Path) -> bool:
    """Train the tiny causal LM; True when its loss fell by at least a third."""
    from bidirlm_jax.configs.lm import get_config
    from bidirlm_jax.train import train
    from bidirlm_jax.train.config import validate

    config = get_config("tiny")
    validate(config)
    train(config, str(out / "lm"))
    losses = [json.loads(line)["loss"] for line in (out / "lm" / "metrics.jsonl").read_text().splitlines()]
    print(
        f"causal LM base (configs/lm.py:tiny): loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} logged steps"
    )
    return losses[-1] < 2 / 3 * losses[0]


def _family(name: str, out: Path) -> list[tuple[str, float]]:
    """Rows of (check, relative error) for one family.

    The bidirectional reference is the same random model (same seed) in transformers' own bidirectional
    mode: Gemma3's `use_bidirectional_attention` config flag, or the generic `is_causal=False` kwarg.
    """
    import transformers

    from bidirlm_jax.io.conversion import convert
    from bidirlm_jax.io.hf import from_pretrained, save_pretrained
    from bidirlm_jax.testing import reference

    if name == "gemma3":
        ref = reference.build(reference.gemma3_config())
        bidirectional = (reference.build(reference.gemma3_config(use_bidirectional_attention=True)), {})
    else:
        ref = reference.build(reference.qwen3_config())
        bidirectional = (ref, {"is_causal": False})
    ckpt = convert(reference.save(ref, out / f"{name}-hf"), out / f"{name}-checkpoint")
    ids, mask = reference.batch()
    rows = []
    for attention, (model, kwargs) in {"causal": (ref, {}), "bidirectional": bidirectional}.items():
        ours = reference.logits(from_pretrained(ckpt, attention=attention), ids, mask)
        theirs = reference.hf_logits(model, ids, mask, **kwargs)
        rows.append((f"{name} {attention}", reference.max_rel_err(ours, theirs, mask)))
    encoder = from_pretrained(ckpt, attention="bidirectional")
    export = save_pretrained(encoder, out / f"{name}-encoder-hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager").eval()
    err = reference.max_rel_err(reference.logits(encoder, ids, mask), reference.hf_logits(reloaded, ids, mask), mask)
    rows.append((f"{name} encoder export, reloaded by transformers", err))
    return rows


def run_demo(out_dir: str | os.PathLike = "demo_out", *, overwrite: bool = False) -> int:
    """Run the demo into `out_dir`; 0 when the base learned and every check is within `TOLERANCE`."""
    import transformers

    from bidirlm_jax.io.atomic import atomic_directory

    out = check_output(out_dir, overwrite=overwrite)
    transformers.utils.logging.disable_progress_bar()
    with atomic_directory(out, overwrite=out.exists()) as tmp:
        trained = _train_base(tmp)
        rows = _family("gemma3", tmp) + _family("qwen3", tmp)
        (tmp / MARKER).write_text(json.dumps({"entries": sorted(p.name for p in tmp.iterdir())}) + "\n")
    print(f"{'check':<50} max |Δlogit| / max |logit|")
    for name, err in rows:
        print(f"{name:<50} {err:.2e}  {'ok' if err < TOLERANCE else 'MISMATCH'}")
    print(f"checkpoints and exports in {out}/")
    return 0 if trained and all(err < TOLERANCE for _, err in rows) else 1
