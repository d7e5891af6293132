"""`bidirlm demo`: the pipeline on tiny random models, offline, checked against transformers at each step.

First the training engine makes a small causal base model (`configs/lm.py:tiny`, next-token loss on a
generated corpus). Then, for Gemma3 and Qwen3: build a random causal LM with transformers, convert it
to a bidirlm checkpoint, run it in both attention modes beside transformers' own forward in the same
mode, export it back as a bidirectional HF directory and reload that with plain
`AutoModelForCausalLM` (no remote code).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import transformers
from flax import nnx

from bidirlm_jax.io.conversion import convert
from bidirlm_jax.io.hf import from_pretrained, save_pretrained
from bidirlm_jax.testing import reference

TOLERANCE = 1e-4
LM_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm.py"


def _train_base(out: Path) -> bool:
    """Train the tiny causal LM; True when its loss fell by at least a third."""
    from bidirlm_jax.train import parse_train_args, train

    config, workdir = parse_train_args([f"--config={LM_CONFIG}:tiny", f"--workdir={out / 'lm'}"])
    train(config, workdir)
    losses = [json.loads(line)["loss"] for line in (out / "lm" / "metrics.jsonl").read_text().splitlines()]
    print(
        f"causal LM base (configs/lm.py:tiny): loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} logged steps"
    )
    return losses[-1] < 2 / 3 * losses[0]


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask).logits


def _family(
    name: str, causal_config, bidirectional_config, bidirectional_kwargs: dict, out: Path
) -> list[tuple[str, float]]:
    """Rows of (check, relative error) for one family.

    The bidirectional reference is the same random model (same seed) in transformers' own bidirectional
    mode: Gemma3's `use_bidirectional_attention` config flag, or the generic `is_causal=False` kwarg.
    """
    ref = reference.build(causal_config)
    references = {"causal": (ref, {}), "bidirectional": (reference.build(bidirectional_config), bidirectional_kwargs)}
    ckpt = convert(reference.save(ref, out / f"{name}-hf"), out / f"{name}-checkpoint")
    ids, mask = reference.batch()
    rows = []
    for attention, (model, kwargs) in references.items():
        ours = _logits(from_pretrained(ckpt, attention=attention), ids, mask)
        rows.append(
            (f"{name} {attention}", reference.max_rel_err(ours, reference.hf_logits(model, ids, mask, **kwargs), mask))
        )
    encoder = from_pretrained(ckpt, attention="bidirectional")
    export = save_pretrained(encoder, out / f"{name}-encoder-hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export, attn_implementation="eager").eval()
    theirs = reference.hf_logits(reloaded, ids, mask)
    rows.append(
        (
            f"{name} encoder export, reloaded by transformers",
            reference.max_rel_err(_logits(encoder, ids, mask), theirs, mask),
        )
    )
    return rows


def run_demo(out_dir: str | Path = "demo_out") -> int:
    transformers.utils.logging.disable_progress_bar()
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    trained = _train_base(out)
    rows = _family(
        "gemma3", reference.gemma3_config(), reference.gemma3_config(use_bidirectional_attention=True), {}, out
    ) + _family("qwen3", reference.qwen3_config(), reference.qwen3_config(), {"is_causal": False}, out)
    print(f"{'check':<50} max |Δlogit| / max |logit|")
    for name, err in rows:
        print(f"{name:<50} {err:.2e}  {'ok' if err < TOLERANCE else 'MISMATCH'}")
    print(f"checkpoints and exports in {out}/")
    return 0 if trained and all(err < TOLERANCE for _, err in rows) else 1
