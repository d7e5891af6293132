"""Tokenizers: the checkpoint's own (transformers' fast tokenizers), a small trained one, and the mask token.

Training text is tokenised with the tokenizer of the checkpoint being adapted; `train_tokenizer` builds a
small byte-level BPE for offline presets and tests, with Gemma3's special-token layout (`<pad>` 0,
`<eos>` 1, `<bos>` 2, `<unk>` 3, `<mask>` 4) and Gemma's habit of prepending `<bos>`.
MNTP needs one mask id: `resolve_mask_token` implements the `mntp.mask_token` setting, and
`set_mask_token` records it in exported tokenizer files so that the encoder's users find it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io import released
from bidirlm_jax.io.atomic import atomic_directory
from bidirlm_jax.io.families import MULTIMODAL_MODEL_TYPES, RESERVED_MASK_IDS
from bidirlm_jax.paths import user_path

if TYPE_CHECKING:  # transformers (and torch behind it) is imported where a tokenizer is built: a run that
    # needs none, such as the causal-LM presets on synthetic tokens, starts seconds sooner
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
# Qwen's chat and media markers, in the order `with_media_tokens` gives them ids.
MEDIA_TOKENS = (
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|audio_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|im_start|>",
    "<|im_end|>",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_MASK_HINT = "set --config.mntp.mask_token=TOKEN_OR_ID"


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The fast tokenizer saved in `path` (an HF checkpoint or tokenizer directory)."""
    path = user_path(path)
    if not path.is_dir():
        raise ConfigError(
            f"tokenizer directory {path} does not exist; give the checkpoint's directory (data.tokenizer)"
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ConfigError(
            f"{path} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); copy the checkpoint's tokenizer "
            "files there or point data.tokenizer / --tokenizer at a directory that has them"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_native_config(path))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot load the tokenizer in {path}: {e}") from None
    if not tokenizer.is_fast:
        raise ConfigError(f"the tokenizer in {path} is not a fast tokenizer; save it with a tokenizer.json")
    return tokenizer


def _native_config(path: Path) -> dict:
    """`config=` the native family's config for a released BidirLM or BidirLM-Omni directory: AutoTokenizer then
    picks the family's tokenizer class instead of importing (or asking to run) the remote code its config.json
    names, or (an Omni directory without `auto_map`) a model type transformers does not know, which it would
    warn about and load as an empty config."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        d = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if released.is_released(d):
        return {"config": AutoConfig.for_model(released.native_config(d)["model_type"])}
    kind = d.get("model_type")
    if kind in MULTIMODAL_MODEL_TYPES and ("auto_map" in d or kind not in CONFIG_MAPPING):  # Omni: remote code only
        return {"config": AutoConfig.for_model(MULTIMODAL_MODEL_TYPES[kind])}
    return {}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike | None = None, *, overwrite: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens on `texts`; also saved to `out_dir` (atomically) if given."""
    smallest = 256 + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise ConfigError(f"vocab_size {vocab_size} is too small for a byte-level BPE; use at least {smallest}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS.index("<bos>")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    if out_dir is not None:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            tokenizer.save_pretrained(tmp)
    return tokenizer


def with_media_tokens(tokenizer: PreTrainedTokenizerFast, first_id: int) -> PreTrainedTokenizerFast:
    """`tokenizer` (below `first_id` tokens) with reserved fillers up to `first_id`, then `MEDIA_TOKENS` from
    there: a small trained tokenizer that renders chat and media prompts for a tiny model whose config
    puts those tokens at `first_id`, `first_id + 1`, … (`models.towers.presets`)."""
    if len(tokenizer) > first_id:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens, past the media tokens' first id {first_id}")
    fillers = [f"<|reserved_{i}|>" for i in range(first_id - len(tokenizer))]
    tokenizer.add_special_tokens({"additional_special_tokens": [*fillers, *MEDIA_TOKENS]})
    return tokenizer


def resolve_mask_token(tokenizer: PreTrainedTokenizerBase, setting: str | int, *, family: str) -> int:
    """The mask id `mntp.mask_token` means: `"auto"`, a token string, or an integer id.

    `"auto"` is the tokenizer's own mask token (Gemma3: `<mask>`, id 4); for a tokenizer without one, the
    family's reserved row (`io.families.RESERVED_MASK_IDS`: BidirLM's Qwen3 row) when the vocabulary has it.
    """
    size = len(tokenizer)
    if setting == "auto":
        if tokenizer.mask_token_id is not None:
            return int(tokenizer.mask_token_id)
        reserved = RESERVED_MASK_IDS.get(family)
        if reserved is not None:
            if size > reserved:
                return reserved
            raise ConfigError(
                f"tokenizer has no mask token, and with {size} tokens it lacks {family.capitalize()}'s reserved row {reserved} "
                f"that BidirLM masks with; {_MASK_HINT}"
            )
        raise ConfigError(f"tokenizer has no mask token; {_MASK_HINT}")
    if (isinstance(setting, int) and not isinstance(setting, bool)) or (isinstance(setting, str) and setting.isdigit()):
        token_id = int(setting)
        if token_id >= size:
            raise ConfigError(f"mntp.mask_token id {token_id} is outside the tokenizer's {size} tokens; {_MASK_HINT}")
        return token_id
    token_id = tokenizer.get_vocab().get(setting) if isinstance(setting, str) else None
    if token_id is None:
        raise ConfigError(f"mntp.mask_token {setting!r} is not a token of the tokenizer; {_MASK_HINT} (or auto)")
    return int(token_id)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id padding positions carry (masked out everywhere): the tokenizer's pad, else eos, else 0."""
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return int(token_id)
    return 0


def check_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Refuse a tokenizer that can emit ids beyond the model's `vocab_size` embedding rows.

    Checked: the base vocabulary and the core special tokens. Added tokens past the embedding (tokenizers
    may list more tokens than the model has rows) are harmless unless the text holds them, which the
    corpus's recorded maximum id catches (`Corpus.check_vocab`).
    """
    specials = {
        name: getattr(tokenizer, f"{name}_token_id")
        for name in ("bos", "eos", "pad", "unk", "mask")
        if getattr(tokenizer, f"{name}_token_id") is not None
    }
    largest = max([tokenizer.vocab_size - 1, *specials.values()])
    if largest >= vocab_size:
        raise ConfigError(
            f"the tokenizer emits ids up to {largest} ({tokenizer.vocab_size} base tokens, specials {specials}) but the "
            f"model's embedding has {vocab_size} rows; use the checkpoint's own tokenizer (data.tokenizer)"
        )


def set_mask_token(
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike, token_id: int
) -> PreTrainedTokenizerBase | Path:
    """Make `token_id` the mask token of a tokenizer object, or of the tokenizer files in a directory.

    A directory's `tokenizer_config.json` gets `mask_token` (the token's string), so that
    `AutoTokenizer.from_pretrained(dir).mask_token_id == token_id`; the file is replaced atomically.
    """
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer.mask_token = _token_string(tokenizer.convert_ids_to_tokens(token_id), token_id)
        return tokenizer
    directory = Path(tokenizer)
    if not (directory / "tokenizer.json").is_file():
        raise ConfigError(f"{directory} has no tokenizer.json to record the mask token {token_id} in")
    token = _token_string(Tokenizer.from_file(str(directory / "tokenizer.json")).id_to_token(token_id), token_id)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["mask_token"] = token
    tmp = config_path.with_name(f".{config_path.name}.tmp")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, config_path)
    return directory


def _token_string(token: str | None, token_id: int) -> str:
    if token is None:
        raise ConfigError(f"mask token id {token_id} is not in the tokenizer's vocabulary")
    return token
