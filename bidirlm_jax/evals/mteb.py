"""MTEB 2.x adapter: our `encode` behind mteb's encoder protocol, with BidirLM's instructions, named per checkpoint.

Instructions come from the table mteb's own BidirLM wrapper lists (`bidirlm_models.bidirlm_task_prompts`), with
the paper's defaults for symmetric tasks; they go on queries and on the texts of symmetric tasks, never on
documents (`prompt_type == document`), in the template training used (`Instruct: ...\\nQuery: `); an empty table
(`instructions={}`) means none at all. mteb caches
results by model name and revision, and an unnamed model is cached as "no_model_name": every checkpoint gets
its own name (from its directory) and a revision hashed from its files and encoding settings, so a new
checkpoint never silently reuses an old one's scores. mteb needs torch; import this module only to use it.

A model with towers (Qwen3-VL, Qwen3-ASR, BidirLM-Omni) takes mteb's images and audio too: its `ModelMeta`
lists the modalities its towers give, the adapter collates mteb's rows itself (`evals.mteb_collate`: soundfile
and soxr, no torchaudio or torchcodec), and composed inputs (an image with a text) are embedded under the
released protocol, the sum of per-modality embeddings, or as one sequence (`embed.compose`). Its instruction
table adds the MIEB and MAEB entries of mteb's BidirLM-Omni wrapper. A task whose modalities the model lacks
is refused before anything runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from datasets import Dataset
from flax import nnx
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_implementations.bidirlm_models import bidirlm_task_prompts
from mteb.models.model_implementations.bidirlm_omni_models import TASK_PROMPTS as OMNI_TASK_PROMPTS
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from bidirlm_jax.data.media.audio import MAX_SECONDS
from bidirlm_jax.data.media.items import MediaProcessor, checkpoint_processor, media_processor
from bidirlm_jax.embed.compose import PROTOCOLS, encode_items, modalities, require_modalities
from bidirlm_jax.embed.encode import encode
from bidirlm_jax.errors import BidirLMError, ConfigError
from bidirlm_jax.evals.mteb_collate import MediaCollator, media_loader
from bidirlm_jax.evals.retrieval import load_beir
from bidirlm_jax.io.digest import directory_digest
from bidirlm_jax.io.sentence_transformers import load_encoder
from bidirlm_jax.models.encoder import embedding_size
from bidirlm_jax.models.transformer import Transformer

log = logging.getLogger(__name__)

MODALITY_COLUMNS = ("text", "image", "audio")

# The paper's defaults where the table has no entry (paper-recipe §3.3); task names in the table win.
TASK_TYPE_INSTRUCTIONS = {
    "STS": "Retrieve semantically similar text",
    "PairClassification": "Retrieve semantically similar text",
    "BitextMining": "Retrieve parallel sentences",
}


def bidirlm_instructions(*, media: bool = False) -> dict[str, str]:
    """Task name (or task type) -> instruction: BidirLM's table as mteb ships it, plus the type defaults; with
    `media`, the MIEB and MAEB entries of the BidirLM-Omni wrapper too."""
    omni = {k: v for k, v in OMNI_TASK_PROMPTS.items() if isinstance(v, str)} if media else {}
    return {**TASK_TYPE_INSTRUCTIONS, **omni, **bidirlm_task_prompts}


class MTEBEncoder(AbsEncoder):
    """A bidirlm model as an mteb encoder: `mteb.evaluate(MTEBEncoder.from_pretrained(DIR), tasks)`."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Any,
        *,
        name: str,
        revision: str,
        pooling: str = "mean",
        normalize: bool = True,
        batch_size: int = 32,
        max_length: int = 512,
        instructions: dict[str, str] | None = None,
        protocol: str = "sum",
    ):
        if "/" not in name:
            raise ConfigError(f"mteb model names are 'organization/model', got {name!r}")
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
        self.model = model
        self.modalities = modalities(model)
        media = len(self.modalities) > 1
        if media and not isinstance(tokenizer, MediaProcessor):
            tokenizer = media_processor(model, tokenizer)
        self.tokenizer = tokenizer
        self.protocol = protocol
        self.encode_kwargs = dict(pooling=pooling, normalize=normalize, batch_size=batch_size, max_length=max_length)
        self.prompts_dict = bidirlm_instructions(media=media) if instructions is None else instructions
        self.prompts_used: dict[tuple[str, str | None], str | None] = {}  # (task, prompt type) -> instruction
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        self.mteb_model_meta = ModelMeta.create_empty(
            overwrites=dict(
                name=name,
                revision=revision,
                embed_dim=embedding_size(model),
                max_tokens=max_length,
                n_parameters=n_params,
                framework=["JAX"],
                similarity_fn_name=ScoringFunction.COSINE,
                use_instructions=True,
                modalities=self.modalities,
                open_weights=True,
            )
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        name: str | None = None,
        attention: str | None = None,
        dtype: str = "float32",
        pooling: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        instructions: dict[str, str] | None = None,
        towers: bool = True,
        protocol: str = "sum",
    ) -> MTEBEncoder:
        """Load an encoder (or HF) directory, with the towers it holds unless `towers=False`; pooling and length
        default to what the directory declares."""
        model, tokenizer, settings = load_encoder(path, attention=attention, dtype=dtype, towers=towers)
        return cls.from_loaded(
            path,
            model,
            tokenizer,
            name=name,
            pooling=pooling or settings.pooling,
            normalize=settings.normalize,
            batch_size=batch_size,
            max_length=max_length or settings.max_length,
            instructions=instructions,
            protocol=protocol,
        )

    @classmethod
    def from_loaded(
        cls,
        path: str | os.PathLike,
        model: Transformer,
        tokenizer: Any,
        *,
        name: str | None = None,
        pooling: str = "mean",
        normalize: bool = True,
        batch_size: int = 32,
        max_length: int = 512,
        instructions: dict[str, str] | None = None,
        protocol: str = "sum",
    ) -> MTEBEncoder:
        """An adapter for a model already loaded from `path`: named after the directory, its revision hashed from
        the directory's files and everything that changes an embedding. A model with towers reads images with
        the directory's `preprocessor_config.json` unless `tokenizer` is a `MediaProcessor` already."""
        media = len(modalities(model)) > 1
        tokenizer = checkpoint_processor(path, model, tokenizer)
        table = bidirlm_instructions(media=media) if instructions is None else instructions
        scoring = dict(
            pooling=pooling,
            normalize=normalize,
            max_length=max_length,
            attention=model.runtime.attention,
            dtype=model.runtime.dtype,
            instructions=sorted(table.items()),
        )
        if media:  # text-only revisions stay as they were
            scoring.update(modalities=modalities(model), protocol=protocol, processor=_processor_settings(tokenizer))
        return cls(
            model,
            tokenizer,
            name=name or f"bidirlm-jax/{Path(path).resolve().name}",
            revision=checkpoint_revision(path, scoring),
            pooling=pooling,
            normalize=normalize,
            batch_size=batch_size,
            max_length=max_length,
            instructions=table,
            protocol=protocol,
        )

    def instruction(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str | None:
        """The instruction for a task's texts of one kind; None for documents, and for every text with an empty
        table (`instructions={}`: a model trained without instructions, not mteb's per-task defaults)."""
        if prompt_type == PromptType.document or not self.prompts_dict:
            return None
        instruction = self.get_instruction(task_metadata, prompt_type)
        return instruction if isinstance(instruction, str) and instruction else None

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """mteb's encoder protocol: a DataLoader of batches with "text" (and "image", "audio" for a model with
        towers) -> `[N, d]` (mteb's batch size is ignored: `encode` sorts and buckets the whole input itself)."""
        instruction = self.instruction(task_metadata, prompt_type)
        key = (task_metadata.name, prompt_type.value if prompt_type else None)
        if key not in self.prompts_used:
            self.prompts_used[key] = instruction
            log.info("%s, %s texts: instruction %r", key[0], key[1] or "all", instruction)
        if len(self.modalities) == 1:
            texts = [text for batch in inputs for text in batch["text"]]
            return encode(self.model, self.tokenizer, texts, instruction=instruction, **self.encode_kwargs)
        max_seconds = self.tokenizer.audio.max_seconds if self.tokenizer.audio else MAX_SECONDS
        items = [item for batch in media_loader(inputs, MediaCollator(max_seconds=max_seconds)) for item in rows(batch)]
        return encode_items(
            self.model, self.tokenizer, items, protocol=self.protocol, instruction=instruction, **self.encode_kwargs
        )


def rows(batch: dict[str, list[Any]]) -> list[str | dict[str, Any]]:
    """A collated batch's inputs: a string per text-only row, else `{"text", "image", "audio"}` with the present
    parts (an empty text beside media counts as absent, as a BEIR line with a path and no text reads)."""
    size = len(next(iter(batch.values())))
    if "video" in batch:
        raise ConfigError("video inputs are not supported; BidirLM's towers read images and audio")
    out = []
    for i in range(size):
        item = {k: batch[k][i] for k in MODALITY_COLUMNS if k in batch and batch[k][i] is not None}
        if len(item) > 1 and not item.get("text"):
            item.pop("text", None)
        out.append(item["text"] if list(item) == ["text"] else item)
    return out


def _processor_settings(processor: MediaProcessor) -> dict[str, Any]:
    """What of a processor changes an embedding: template, image settings, clip length."""
    return dict(
        template=processor.template,
        vision=repr(processor.vision.settings) if processor.vision else None,
        audio_seconds=processor.audio.max_seconds if processor.audio else None,
    )


def checkpoint_revision(path: str | os.PathLike, settings: dict[str, Any] | None = None) -> str:
    """A hash of every file of a model directory (weights, config, tokenizer, prompts) and of the encoding
    settings: equal only for the same checkpoint evaluated the same way."""
    digest = hashlib.blake2b(directory_digest(path).encode(), digest_size=8)
    digest.update(repr(sorted((settings or {}).items())).encode())
    return digest.hexdigest()


def beir_task(
    path: str | os.PathLike, *, split: str = "test", name: str = "LocalBEIRRetrieval", instruction: str | None = None
) -> AbsTaskRetrieval:
    """An mteb retrieval task over a local BEIR directory, loaded already (no Hub access); `instruction` is its
    query prompt when BidirLM's table has no entry for `name`. Images and clips of the directory become
    `datasets.Image` / `datasets.Audio` columns, as hub tasks hold them, and the task's category (t2i, a2t,
    it2t, ...) says which modalities each side holds."""
    data = load_beir(path, split)
    query_modalities, doc_modalities = data.modalities()
    category = f"{_letters(query_modalities)}2{_letters(doc_modalities)}"
    try:
        metadata = TaskMetadata(
            name=name,
            type="Retrieval",
            category=category,
            modalities=[m for m in MODALITY_COLUMNS if m in query_modalities + doc_modalities],
            main_score="ndcg_at_10",
            description=f"Local BEIR data in {Path(path).resolve()}",
            reference=None,
            dataset={"path": str(Path(path).resolve()), "revision": "local"},
            eval_splits=[split],
            eval_langs=["eng-Latn"],
            date=None,
            domains=None,
            task_subtypes=None,
            license=None,
            annotations_creators=None,
            dialect=None,
            sample_creation=None,
            bibtex_citation=None,
            prompt={"query": instruction} if instruction else None,
        )
    except ValueError as e:  # pydantic's ValidationError: a category mteb has no name for
        raise ConfigError(f"{path}: mteb has no task category {category!r} ({type(e).__name__})") from None
    task = type(name, (AbsTaskRetrieval,), {"metadata": metadata})()
    queries = data.evaluated_queries()
    corpus = [{"id": d, "title": t, "text": x, **data.corpus_media.get(d, {})} for d, (t, x) in data.corpus.items()]
    task.dataset = {
        "default": {
            split: {
                "corpus": _with_media(corpus, doc_modalities),
                "queries": _with_media(
                    [{"id": q, "text": data.queries[q], **data.query_media.get(q, {})} for q in queries],
                    query_modalities,
                ),
                "relevant_docs": {q: dict(data.qrels[q]) for q in queries},
                "top_ranked": None,
            }
        }
    }
    task.data_loaded = True
    return task


def _letters(modalities: list[str]) -> str:
    """mteb's category letters of one side: image, audio, then text (it2t, at2i, ...)."""
    return "".join(m[0] for m in ("image", "audio", "text") if m in modalities)


def _with_media(rows: list[dict[str, Any]], modalities: list[str]) -> Dataset:
    """Rows as a Dataset whose image and audio paths are `datasets.Image` / `datasets.Audio` columns."""
    from datasets import Audio, Image

    keys = [k for k in ("id", "title", "text", "image", "audio") if k in rows[0] or k in modalities]
    dataset = Dataset.from_dict({key: [row.get(key) for row in rows] for key in keys})
    for key, feature in (("image", Image()), ("audio", Audio())):
        if key in modalities:
            dataset = dataset.cast_column(key, feature)
    return dataset


def run_mteb(
    encoder: MTEBEncoder, tasks: list[Any], *, cache_dir: str | os.PathLike | None = None
) -> dict[str, dict[str, Any]]:
    """Evaluate `encoder` on mteb tasks (names, whose data must be available locally, or task objects) ->
    `{task: {"main_score": mean, "scores": {split: {subset: {metric: value}}}}}`."""
    import mteb

    loaded = [load_task(t) if isinstance(t, str) else t for t in tasks]
    for task in loaded:
        check_modalities(encoder, task)
    cache = mteb.ResultCache(cache_dir) if cache_dir is not None else None
    result = mteb.evaluate(encoder, loaded, cache=cache, overwrite_strategy="only-missing", show_progress_bar=False)
    out = {}
    for task_result in result:
        scores = {
            split: {s["hf_subset"]: {k: v for k, v in s.items() if isinstance(v, (int, float))} for s in subsets}
            for split, subsets in task_result.scores.items()
        }
        out[task_result.task_name] = {"main_score": float(task_result.get_score()), "scores": scores}
    return out


def check_modalities(encoder: MTEBEncoder, task: Any) -> None:
    """Refuse a task whose inputs the model cannot read (mteb only warns when a retrieval side half fits)."""
    require_modalities(encoder.model, task.metadata.modalities, f"mteb task {task.metadata.name}")


def load_task(name: str) -> Any:
    """An mteb task by name with its data loaded from the local cache; a clear error when it is not there."""
    import mteb

    try:
        task = mteb.get_task(name)
    except KeyError:
        raise ConfigError(f"{name!r} is not an mteb task; list them with `mteb available-tasks`") from None
    try:
        task.load_data()
    except Exception as e:  # datasets raises many types for missing files and no network
        raise BidirLMError(
            f"the data of mteb task {name} is not available locally ({type(e).__name__}: {e}); download it once "
            f"with network access (python -c \"import mteb; mteb.get_task('{name}').load_data()\"), or evaluate "
            "local data in the BEIR layout with --beir DIR"
        ) from None
    return task
