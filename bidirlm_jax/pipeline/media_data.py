"""The Omni stage's media, written as a user gives it: photographs and clips as files beside pair files, and
a held-out retrieval set per modality.

Every install can make both: scikit-image's sample photographs with captions written for them
(`data.media.samples`) and espeak-ng speaking known sentences (`data.media.speech`). Training pairs are
crop → caption and clip → transcript (`{"query": {"image": "images/…png"}, "positive": text}`, paths relative
to the pair file, as `data.pairs` reads them; text positives, so a batch's repeated captions can be masked); the held-out sets are other crops (another seed) of the same
photographs and other renderings (speed, pitch) of the same sentences, so a model shows it learned to match
an unseen image or clip to its words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import soundfile

from bidirlm_jax.configs.sizes import Size

HELD_OUT = 2  # crops per photograph, renderings per sentence


@dataclass(frozen=True)
class MediaRetrieval:
    """A held-out text → media retrieval set: queries (captions or transcripts), documents (media items with
    absolute paths) and which documents answer each query."""

    modality: str
    queries: dict[str, str]
    documents: dict[str, dict[str, str]]
    qrels: dict[str, dict[str, int]]


@dataclass(frozen=True)
class MediaData:
    pairs: dict[str, Path]  # modality -> its training pair file (the dataset is the file's stem)
    held_out: dict[str, MediaRetrieval]  # modality -> held-out retrieval set


def write_media(data_dir: Path, size: Size) -> MediaData:
    """Write `data_dir/media/` (images/, clips/, image_pairs.jsonl, audio_pairs.jsonl) and return the pair files
    and held-out sets. Raises `ConfigError` when espeak-ng or scikit-image is missing, before anything trains."""
    from bidirlm_jax.data.media.samples import sample_image_pairs
    from bidirlm_jax.data.media.speech import spoken_pairs

    root = data_dir / "media"
    made = {
        "image": {
            split: [(caption, item["image"]) for caption, item in sample_image_pairs(crops, seed=seed)]
            for split, seed, crops in (("train", 0, size.image_crops), ("held_out", 1, HELD_OUT))
        },
        "audio": {
            split: [(text, item["audio"]) for item, text in spoken_pairs(variants, seed=seed)]
            for split, seed, variants in (("train", 0, size.speech_variants), ("held_out", 1, HELD_OUT))
        },
    }
    pairs, held_out = {}, {}
    for modality, splits in made.items():
        folder = root / ("images" if modality == "image" else "clips")
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            split: [_save(media, folder / f"{split}-{i:03d}") for i, (_, media) in enumerate(rows)]
            for split, rows in splits.items()
        }
        pairs[modality] = root / f"{modality}_pairs.jsonl"
        with pairs[modality].open("w", encoding="utf-8") as f:
            for (text, _), path in zip(splits["train"], files["train"], strict=True):
                f.write(json.dumps({"query": {modality: str(path.relative_to(root))}, "positive": text}) + "\n")
        held_out[modality] = _retrieval(modality, [t for t, _ in splits["held_out"]], files["held_out"])
    return MediaData(pairs, held_out)


def _save(media, stem: Path) -> Path:
    """A PIL image as PNG, a `{"array", "sampling_rate"}` clip as WAV."""
    if isinstance(media, dict):
        path = stem.with_suffix(".wav")
        soundfile.write(path, media["array"], media["sampling_rate"])
    else:
        path = stem.with_suffix(".png")
        media.save(path)
    return path


def _retrieval(modality: str, texts: list[str], paths: list[Path]) -> MediaRetrieval:
    """One query per distinct text; its documents are every held-out item made from it."""
    query_ids = {text: f"q{i}" for i, text in enumerate(dict.fromkeys(texts))}
    documents = {f"d{i}": {modality: str(path)} for i, path in enumerate(paths)}
    qrels: dict[str, dict[str, int]] = {q: {} for q in query_ids.values()}
    for i, text in enumerate(texts):
        qrels[query_ids[text]][f"d{i}"] = 1
    return MediaRetrieval(modality, {q: text for text, q in query_ids.items()}, documents, qrels)
