"""Which files travel with a model's weights into a new directory, and why: one policy for `save_pretrained`,
`convert`, the exports and `merge`.

A model directory is its weights, its config.json and what its users need to feed and run it: the tokenizer
(its ids are the embedding's rows), the chat template, the generation settings, the towers' processors
(`preprocessor_config.json`: pixels and mel features must be computed as the towers were trained),
sentence-transformers modules (pooling, normalisation, prompts), a licence. An output writes its own
weights and config.json; everything else still describes the weights, so it travels — a deny-list, because
an allow-list silently drops the next file a model needs (a tower's processor did). What stays, and why,
is listed below; hidden files (tool and version-control state) stay too.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from bidirlm_jax.io.run import HEAD_FILE, LORA_FILE, PROMPTS_FILE, description_dir
from bidirlm_jax.io.sources import PARAMS_DIR, Source, source_of

# Weights, at any depth: the output holds its own (the source's would not be the converted or merged ones).
WEIGHTS = re.compile(
    r".*\.(safetensors|bin|pt|pth|ckpt|msgpack|h5|gguf|onnx|onnx_data|ot|tflite|npz|npy|pkl)"
    r"|.*\.(safetensors|bin)\.index\.json"
)
# At the top: files that describe the source itself; the output writes its own.
DESCRIBES_SOURCE = ("config.json", "README.md")
# A bidirlm checkpoint's orbax weights (`params/`) and a training run's records, which exports translate
# (the head into the classifier's config, the prompts into sentence-transformers' prompts, the adapters merged).
_RUN_RECORDS = (HEAD_FILE, PROMPTS_FILE, LORA_FILE)
_OF_SOURCE = {Source.CHECKPOINT: (PARAMS_DIR,), Source.RUN: _RUN_RECORDS, Source.FINETUNE_RUN: _RUN_RECORDS}
# What a sentence-transformers export writes itself (its modules, numbered folders): the source's would
# describe another pooling. Converts and merges keep the source's, since the weights keep their meaning.
ENCODER_MODULES = r"modules\.json|sentence_bert_config\.json|config_sentence_transformers\.json|\d+_\w+"


@dataclass(frozen=True)
class Companions:
    """The files of `root` that travel (relative paths)."""

    root: Path
    files: tuple[Path, ...]

    def copy_into(self, out: Path) -> None:
        for rel in self.files:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.root / rel, out / rel)


def companion_files(
    src: str | os.PathLike, *, owned: str = "", subdirectories: bool = True, skip: Path | None = None
) -> Companions:
    """What travels from `src` (a training run: its `model/`) into a new directory.

    `owned`: a regex of top-level names the output writes itself (a merge's recipe, an export's
    sentence-transformers modules); `subdirectories`: False keeps to the top level; `skip`: a directory
    never entered (an output inside the source). Weight files in subdirectories are left behind with a
    warning: a module that needs them must get them back by hand."""
    source = source_of(src)
    root = description_dir(src)
    stays = set(DESCRIBES_SOURCE) | set(_OF_SOURCE.get(source, ()))
    owns = re.compile(owned) if owned else None
    files, left = [], []
    for where, dirs, names in os.walk(root):
        here = Path(where)
        top = here == root
        dirs[:] = sorted(
            d
            for d in dirs
            if subdirectories
            and not d.startswith(".")
            and not (top and (d in stays or (owns and owns.fullmatch(d))))
            and (skip is None or (here / d).resolve() != Path(skip).resolve())
        )
        for name in sorted(names):
            rel = (here / name).relative_to(root)
            if name.startswith(".") or (top and (name in stays or (owns and owns.fullmatch(name)))):
                continue
            if WEIGHTS.fullmatch(name):
                if not top:
                    left.append(str(rel))
                continue
            files.append(rel)
    if left:
        warnings.warn(
            "weight files in subdirectories of the source are not carried (they hold the source's weights, not "
            "the output's); a module that needs them must get them back by hand:\n  " + "\n  ".join(left),
            stacklevel=2,
        )
    return Companions(root, tuple(files))
