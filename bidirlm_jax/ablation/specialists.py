"""The models of the composition study (`ablation.composition`): the encoder and the specialist, built here when
the config says `build`, and their merges, one per ratio.

    WORKDIR/encoder/bi-mntp/        Bi+MNTP built from the base (`pipeline.variants`, its MNTP run beside it)
    WORKDIR/specialist/KEY/model/   the base adapted by causal LM on the task's labelled text (runs/lm/, data/)
    WORKDIR/variants/SLUG-KEY/      Merge(encoder, specialist) at one ratio (an HF directory)

A directory built here is named by the digest of what determines it (`provenance_key`): for a specialist its
base's files and the adaptation's settings, for a merge its two inputs' files and its ratio. So a changed
input is a new directory, and everything made from it is made anew, while the old ones stay reusable.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from bidirlm_jax.errors import ConfigError, Preempted

ENCODER, SPECIALIST = "Bi+MNTP", "Bi+Specialist"
DIGESTS = "digests.json"  # WORKDIR/: the files' digests `io.digest` remembers between runs


def provenance_key(settings: Any) -> str:
    """A short digest of JSON `settings`: the name of what they determine."""
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=6).hexdigest()


def files(path: Path, work: Path) -> str:
    """The digest of a checkpoint directory's files (remembered in WORKDIR/digests.json)."""
    from bidirlm_jax.io.digest import directory_digest

    return directory_digest(path, cache=work / DIGESTS)


def variant_name(ratio: float) -> str:
    """Weight 0 on the specialist is the encoder (Bi+MNTP), 1 the specialist read bidirectionally."""
    return ENCODER if ratio == 0 else SPECIALIST if ratio == 1 else f"Merge {ratio:g}"


def variant_slug(ratio: float) -> str:
    return {0.0: "bi-mntp", 1.0: "bi-specialist"}.get(ratio, f"merge-{100 * ratio:g}")


def build_encoder(base: Path, mntp: ConfigDict, work: Path, timer) -> Path:
    """Bi+MNTP of `base` (`pipeline.variants.build_variants`, reused when built with the same recipe)."""
    from bidirlm_jax.pipeline.variants import BI_MNTP, Recipe, build_variants

    def phase(name: str, variant, seconds: float) -> None:
        timer.record(f"encoder: {name}", seconds, "reused" if not seconds else str(variant.path))

    built = build_variants(base, work / "encoder", Recipe(mntp=mntp), names=[BI_MNTP], on_phase=phase)
    return built[BI_MNTP].path


def specialist_texts(task_config: ConfigDict, adapt: ConfigDict) -> list[str]:
    """The labelled text a built specialist learns its task from, one "TEXT => LABEL" line per example of a
    generated split of its own (`adapt.examples` examples, seed `adapt.seed`): the task put generatively, as
    a guard model holds it."""
    from bidirlm_jax.data.labeled_synthetic import synthetic_split

    kind = task_config.objective
    if task_config.data.source != "synthetic" or kind == "token_classification":
        raise ConfigError(
            "specialist=build adapts the base on a generated sequence task (data.source=synthetic); for another "
            "task give the specialist's HF directory: --config.specialist=DIR"
        )
    split = synthetic_split(kind, int(adapt.examples), seed=int(adapt.seed), name="specialist")
    return [f"{text} => {label}" for text, label in zip(split.texts, split.labels)]


def build_specialist(base: Path, texts: list[str], adapt: ConfigDict, seq_len: int, work: Path, timer) -> Path:
    """`WORKDIR/specialist/KEY/model`: `base` adapted by causal LM on `texts` (`pipeline.base.adapt_causal`)."""
    from bidirlm_jax.configs.sizes import Size
    from bidirlm_jax.io.atomic import atomic_directory
    from bidirlm_jax.pipeline.base import adapt_causal

    settings = {"base": files(base, work), "adapt": adapt.to_dict(), "texts": provenance_key(texts), "seq": seq_len}
    out = work / "specialist" / provenance_key(settings)
    if (out / "model" / "config.json").is_file():
        timer.record("specialist", 0.0, "reused")
        return out / "model"
    size = Size(
        seq_len=seq_len, lm_steps=int(adapt.steps), lm_batch=int(adapt.batch_size), lm_learning_rate=adapt.learning_rate
    )
    try:
        with atomic_directory(out) as tmp:
            adapt_causal(base, texts, tmp, size=size, timer=timer)
            (tmp / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    except Preempted as e:  # its run lay in the temporary directory, now removed
        raise Preempted(e.workdir, e.step, kept=False) from None
    return out / "model"


def build_merge(encoder: Path, specialist: Path, ratio: float, work: Path, timer) -> tuple[Path, dict[str, Any]]:
    """(`WORKDIR/variants/SLUG-KEY/`, its provenance): (1 − ratio)·encoder + ratio·specialist, streamed, in the
    specialist's layout (its towers, config and tokenizer carried), bidirectional."""
    from bidirlm_jax.merge import MergeModel, MergeSpec, merge_checkpoints

    provenance = {"encoder": files(encoder, work), "specialist": files(specialist, work), "ratio": ratio}
    path = work / "variants" / f"{variant_slug(ratio)}-{provenance_key(provenance)}"
    if (path / "config.json").is_file():
        timer.record(f"variant: {variant_name(ratio)}", 0.0, "reused")
        return path, provenance
    spec = MergeSpec(
        (MergeModel(str(encoder), 1.0 - ratio), MergeModel(str(specialist), ratio)),
        base=str(specialist),
        attention="bidirectional",
    )
    with timer.phase(f"variant: {variant_name(ratio)}") as note:
        merge_checkpoints(spec, path, progress=False)
        note["text"] = str(path)
    return path, provenance
