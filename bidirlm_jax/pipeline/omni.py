"""The demo's Omni stage (BidirLM §6.3, App. E in miniature): specialists, the composition, Omni training and
a retrieval table across modalities.

1. media: photographs and spoken sentences as files, with held-out sets (`pipeline.media_data`);
2. a vision and an audio specialist grown from the causal base (`pipeline.specialists`);
3. BidirLM-Omni composed from Bi+MNTP and the two specialists (backbones 1/3 each, towers carried,
   `pipeline.stages.compose_omni`), and for comparison the same towers on Bi+MNTP's backbone alone
   (weights 0 / 1 / 0: "not composed");
4. each trained contrastively on the Omni mixture (65 % text pairs with their hard negatives, 17.5 % image,
   17.5 % audio, 0 negatives for media), towers frozen, as the release was;
5. text→text (the held-out docstrings), text→image and text→audio retrieval for every model that reads the
   modality: the text encoder, each specialist, the composition before training, Omni not composed and
   composed (nDCG@10, MRR@10, R@100).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from bidirlm_jax.configs.sizes import Size
from bidirlm_jax.errors import Preempted
from bidirlm_jax.pipeline.corpus import EVAL_INSTRUCTION, Corpus
from bidirlm_jax.pipeline.evaluate import quiet
from bidirlm_jax.pipeline.media_data import MediaData, MediaRetrieval, write_media
from bidirlm_jax.pipeline.report import loss_summary
from bidirlm_jax.pipeline.specialists import MODALITIES, attach_tower, specialist_config
from bidirlm_jax.pipeline.timer import Timer

MIX = {"text": 0.65, "image": 0.175, "audio": 0.175}  # BidirLM-Omni's contrastive mixture (App. E)
TASKS = ("text", "image", "audio")  # text→text, text→image, text→audio
COMPOSED, NOT_COMPOSED = "Omni, composed", "Omni, not composed"
COMPOSED_UNTRAINED = "composed, untrained"  # the composition before the Omni stage: what training adds
SPECIALIST = {"image": "vision specialist", "audio": "audio specialist"}


def omni_stage(
    out: Path,
    *,
    base: Path,
    bi_mntp: Path,
    text_encoder: Path,
    corpus: Corpus,
    template: ConfigDict,
    size: Size,
    timer: Timer,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Build and evaluate everything under `out` (`omni/`, with the media under `out/../data/media`);
    returns {model: {"tasks": {task: metrics}, "path": ...}}. `template`: the text variants' contrastive
    config (its pair files, instructions and optimizer), which the Omni runs extend with media."""
    from bidirlm_jax.merge.omni_recipe import OmniRecipe
    from bidirlm_jax.pipeline.stages import compose_omni

    with timer.phase("omni: media") as note:
        media = write_media(out.parent / "data", size)
        note["text"] = ", ".join(
            f"{m}: {sum(1 for _ in media.pairs[m].open())} pairs, {len(r.documents)} held out"
            for m, r in media.held_out.items()
        )
    specialists = {}
    for modality in MODALITIES:
        with timer.phase(f"omni: {SPECIALIST[modality]}") as note:
            init = attach_tower(base, out / "init" / modality, modality, size)
            run = out / "runs" / f"{modality}-specialist"
            specialists[modality] = _train(
                specialist_config(template, init, media.pairs[modality], size, progress),
                run,
                out / f"{modality}-specialist",
                init,
            )
            note["text"] = f"base + fresh tower, {size.specialist_steps} steps, {loss_summary(run)}"
    tokenizer = _tokenizer(base)
    settings = OmniRecipe(  # this tokenizer's audio markers; each specialist's own rows for its tokens
        special_token_rows="specialist",
        audio_start_token_id=tokenizer.convert_tokens_to_ids("<|audio_start|>"),
        audio_end_token_id=tokenizer.convert_tokens_to_ids("<|audio_end|>"),
    )
    models = {}
    for name, weights in ((NOT_COMPOSED, (0.0, 1.0, 0.0)), (COMPOSED, (1 / 3, 1 / 3, 1 / 3))):
        slug = name.split(", ")[1].replace(" ", "-")
        with timer.phase(f"omni: {name}") as note:
            init = compose_omni(
                bi_mntp,
                specialists["image"],
                specialists["audio"],
                out / "init" / slug,
                weights=weights,
                settings=settings,
            )
            run = out / "runs" / slug
            models[name] = _train(_omni_config(template, init, media, size, progress), run, out / slug, init)
            shares = "/".join(f"{w:.2f}" for w in weights)
            note["text"] = f"backbones (vision/text/audio) {shares}, {size.omni_steps} steps, {loss_summary(run)}"
    evaluated = {
        "Bi+MNTP+Contrastive": text_encoder,
        **{SPECIALIST[m]: p for m, p in specialists.items()},
        COMPOSED_UNTRAINED: out / "init" / "composed",
        **models,
    }
    with quiet("bidirlm_jax.embed.encode"):  # long docstrings cut and photographs scaled down, on purpose
        return {
            name: {"path": str(path), "tasks": _evaluate(name, path, corpus, media, size, timer)}
            for name, path in evaluated.items()
        }


def _train(config: ConfigDict, run: Path, dst: Path, init: Path) -> Path:
    from bidirlm_jax.evals.registry import EVALUATORS
    from bidirlm_jax.pipeline.stages import run_to_hf
    from bidirlm_jax.train import train

    if (result := train(config, str(run), evaluators=EVALUATORS))["preempted"]:
        raise Preempted(run, result["step"])
    return run_to_hf(run, dst, attention="bidirectional", tokenizer_from=init)


def _omni_config(template: ConfigDict, init: Path, media: MediaData, size: Size, progress: bool) -> ConfigDict:
    """The Omni run: the text variants' pairs beside the image and audio pairs at `MIX`, towers frozen."""
    from bidirlm_jax.data.pairs import read_pairs

    c = copy.deepcopy(template)
    text = read_pairs(c.data.path)  # the text datasets share MIX["text"] by size
    total = sum(len(d.queries) for d in text)
    weights = {d.name: MIX["text"] * len(d.queries) / total for d in text}
    weights.update({media.pairs[m].stem: MIX[m] for m in MODALITIES})
    c.model.update(init_from=str(init), attention="bidirectional", towers=True)
    c.data.update(
        path=",".join([c.data.path, *(str(media.pairs[m]) for m in MODALITIES)]),
        weights=";".join(f"{k}:{v:.4f}" for k, v in weights.items()),
        seq_len=size.omni_seq_len,
        global_batch_size=size.omni_batch,
    )
    c.contrastive.update(
        max_pixels=size.max_pixels, max_seconds=size.max_seconds, train_towers=False, mask_duplicates=True
    )
    c.optim.update(learning_rate=size.omni_learning_rate, warmup_steps=max(1, size.omni_steps // 10))
    c.train.update(steps=size.omni_steps, checkpoint_every=size.omni_steps, log_every=max(1, size.omni_steps // 20))
    c.metrics.progress_bar = progress
    return c


def _tokenizer(path: Path):
    from bidirlm_jax.io.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _evaluate(
    name: str, path: Path, corpus: Corpus, media: MediaData, size: Size, timer: Timer
) -> dict[str, dict[str, float]]:
    """nDCG@10, MRR@10, R@100 of `path` on every task whose modality it reads (queries instructed on text→text
    only, as trained)."""
    from bidirlm_jax.data.media.images import read_preprocessor_config
    from bidirlm_jax.data.media.items import media_processor
    from bidirlm_jax.evals.retrieval import document_text
    from bidirlm_jax.io.hf import from_pretrained

    model = from_pretrained(path)
    config = model.config
    tokenizer = _tokenizer(path)
    has = {
        "text": True,
        "image": getattr(config, "vision", None) is not None,
        "audio": getattr(config, "audio", None) is not None,
    }
    if has["image"] or has["audio"]:
        tokenizer = media_processor(
            model, tokenizer, preprocessor=read_preprocessor_config(path), max_seconds=size.max_seconds
        )
    data = corpus.eval_data
    text = MediaRetrieval("text", data.queries, {d: document_text(*data.corpus[d]) for d in data.corpus}, data.qrels)
    results = {}
    for task, retrieval in (("text", text), *media.held_out.items()):
        if not has[task]:
            continue
        with timer.phase(f"omni eval: {name}, text→{task}") as note:
            instruction = EVAL_INSTRUCTION if task == "text" else None
            results[task] = _retrieval(model, tokenizer, retrieval, instruction, size.seq_len)
            note["text"] = f"nDCG@10 {100 * results[task]['ndcg_at_10']:.1f}"
    return results


def _retrieval(model, tokenizer, data: MediaRetrieval, instruction: str | None, max_length: int) -> dict[str, float]:
    from bidirlm_jax.embed.encode import encode
    from bidirlm_jax.evals.retrieval import rank, retrieval_metrics

    query_ids = [q for q, rels in data.qrels.items() if rels]
    doc_ids = list(data.documents)
    kw = dict(pooling="mean", batch_size=32, max_length=max_length, progress=False)
    docs = encode(model, tokenizer, [data.documents[d] for d in doc_ids], **kw)
    queries = encode(model, tokenizer, [data.queries[q] for q in query_ids], instruction=instruction, **kw)
    return retrieval_metrics(dict(zip(query_ids, rank(queries, docs, doc_ids), strict=True)), data.qrels)
