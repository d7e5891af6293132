"""BidirLM-Omni's composition as a streamed merge plan (paper §6.3, App. E): text backbones of different
layouts averaged, the vision tower carried from one input and the audio tower from another, written in
the released `bidirlm_omni` layout.

The inputs' text backbones (Qwen3-VL's `model.language_model.`, a Qwen3 encoder's `model.`, Qwen3-ASR's
`model.language_model.` or `thinker.model.`) are matched by their backbone-relative names and merged with
the spec's weights, embeddings and norms included, into `language_model.`; LM heads are left out (the
Omni model ties its head to the embedding). The vision tower (`model.visual.` → `visual.`, every declared
DeepStack merger) and the audio tower (`model.audio_tower.` + `model.multi_modal_projector.linear_{1,2}`
→ `audio_tower.` with `proj{1,2}`, or `thinker.audio_tower.` as is) are copied bit for bit. The output's
config.json is composed (text from the vision input with the recipe's rope θ and M-RoPE sections, its
tower with the recipe's DeepStack taps, the audio tower from the audio input), the tokenizer input's files
travel, and `preprocessor_config.json` joins the vision input's image processor and the audio input's
feature extractor. Every setting is resolved here and recorded (`merge.omni_recipe`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.io.companions import companion_files
from bidirlm_jax.io.hf_config_audio import qwen3_asr_config_from_hf
from bidirlm_jax.io.hf_config_omni import omni_config_to_hf
from bidirlm_jax.io.hf_config_vision import qwen3_vl_config_from_hf
from bidirlm_jax.io.layouts import AUDIO, AUDIO_PROJECTOR, LM_HEAD, VISION, Layout, detect_layout
from bidirlm_jax.io.weights.audio import audio_tables
from bidirlm_jax.io.weights.vision import vision_table
from bidirlm_jax.merge.linear import listing
from bidirlm_jax.merge.omni_recipe import AUDIO_END_TOKEN_ID, AUDIO_START_TOKEN_ID, OmniRecipe
from bidirlm_jax.merge.plan import MERGEABLE, Entry, Input, Plan, check_configs, index_input, open_input
from bidirlm_jax.merge.spec import RECORD_FILE, MergeSpec, same_path
from bidirlm_jax.models.runtime import Runtime
from bidirlm_jax.models.towers.omni.config import OmniConfig

PREPROCESSOR = "preprocessor_config.json"
_TOWERS = (VISION, AUDIO, AUDIO_PROJECTOR)
_PROJECTOR = {"linear_1": "proj1", "linear_2": "proj2"}  # -hf's projector names -> the AuT layout's


def plan_compose(spec: MergeSpec, out: str | os.PathLike, *, allow_pickle: bool = False) -> Plan:
    """Open the inputs and decide every output tensor and file of the composition, refusing anything that
    would be lost, ambiguous or shaped differently before a byte is written."""
    exclude = [re.compile(p) for p in spec.exclude]
    inputs = [open_input(m, allow_pickle) for m in spec.models]
    for inp in inputs:
        index_input(inp, exclude)
    check_configs(inputs)
    towers = [detect_layout(inp.reader.keys(), _TOWERS) for inp in inputs]
    recipe = spec.compose
    v = _tower_input(spec, towers, VISION, recipe.vision, "vision")
    a = _tower_input(spec, towers, AUDIO, recipe.audio, "audio")
    tok = a if recipe.tokenizer is None else _input_index(spec, recipe.tokenizer, "tokenizer")
    config = _omni_config(inputs, v, a, recipe)
    recipe = _resolved(recipe, inputs, v, a, tok, config)
    entries = _backbone(inputs, spec, _special_rows(config, recipe, v, a))
    carried, dropped = _towers(inputs, towers, v, a, config)
    target = spec.output_dtype or np.dtype(entries[0].dtype).name
    tok_dir = inputs[tok].directory
    return Plan(
        spec=spec.replace(compose=recipe),
        inputs=inputs,
        entries=entries + carried,
        files=companion_files(tok_dir, owned=f"{re.escape(RECORD_FILE)}|{re.escape(PREPROCESSOR)}", skip=Path(out)),
        config=omni_config_to_hf(config, Runtime(attention="bidirectional", bidirectional_window="full"), dtype=target),
        out_dtype=spec.output_dtype or (target if len({e.dtype for e in entries}) == 1 else None),
        documents=_preprocessor(inputs[v], inputs[a]),
        dropped=tuple(dropped)
        + tuple((inputs[spec.base_index].model.path, k) for k in inputs[spec.base_index].excluded),
    )


def _input_index(spec: MergeSpec, path: str, what: str) -> int:
    for i, model in enumerate(spec.models):
        if same_path(model.path, path):
            return i
    raise ConfigError(f"the composition's {what} input {path} is not one of the merged models; add it to the models")


def _tower_input(spec: MergeSpec, towers: list[Layout], component, path: str | None, name: str) -> int:
    """The input whose `name` tower is carried: the recipe's, or the only one holding such a tower."""
    holders = [i for i, layout in enumerate(towers) if layout.prefix(component) is not None]
    if path is not None:
        i = _input_index(spec, path, name)
        if i not in holders:
            raise ConfigError(f"{path} holds no {name} tower (no {component.name}.* tensors), so it cannot give one")
        return i
    if not holders:
        raise ConfigError(
            f"no input holds {'a vision' if name == 'vision' else 'an audio'} tower ({component.name}.* tensors): "
            "a BidirLM-Omni composition carries one "
            f"from a {'Qwen3-VL' if name == 'vision' else 'Qwen3-ASR'} input"
        )
    if len(holders) > 1:
        paths = ", ".join(spec.models[i].path for i in holders)
        raise ConfigError(
            f"{len(holders)} inputs hold a {name} tower ({paths}); say which one the composition carries "
            f"(bidirlm.compose.{name}: PATH in the YAML, --{name}-from PATH)"
        )
    return holders[0]


def _omni_config(inputs: list[Input], v: int, a: int, recipe: OmniRecipe) -> OmniConfig:
    """The output's config: text and tower from the vision input, audio tower from the audio input, the
    recipe's settings applied (rope θ, M-RoPE sections, DeepStack taps, audio delimiters)."""
    vl_config = _read(inputs[v], qwen3_vl_config_from_hf, "qwen3_vl")
    asr_config = _read(inputs[a], qwen3_asr_config_from_hf, "qwen3_asr")
    text = vl_config.text
    rope = text.rope_full if recipe.rope_theta is None else dataclasses.replace(text.rope_full, theta=recipe.rope_theta)
    section = recipe.mrope_section or text.mrope_section
    if sum(section) != text.head_dim // 2:
        raise ConfigError(f"mrope_section {list(section)} must sum to head_dim/2 = {text.head_dim // 2}")
    vision = vl_config.vision
    taps = recipe.deepstack_visual_indexes or vision.deepstack_visual_indexes
    if len(taps) != len(vision.deepstack_visual_indexes):
        raise ConfigError(
            f"deepstack_visual_indexes {list(taps)} name {len(taps)} taps but the vision tower has "
            f"{len(vision.deepstack_visual_indexes)} DeepStack mergers; give one index per merger"
        )
    return OmniConfig(
        text=text.replace(rope_full=rope, mrope_section=tuple(section), tie_word_embeddings=True),
        vision=vision.replace(deepstack_visual_indexes=tuple(taps)),
        audio=asr_config.audio.replace(audio_attention="clip"),  # what the released remote code runs
        image_token_id=vl_config.image_token_id,
        video_token_id=vl_config.video_token_id,
        vision_start_token_id=vl_config.vision_start_token_id,
        vision_end_token_id=vl_config.vision_end_token_id,
        audio_token_id=asr_config.audio_token_id,
        audio_start_token_id=_or(recipe.audio_start_token_id, AUDIO_START_TOKEN_ID),
        audio_end_token_id=_or(recipe.audio_end_token_id, AUDIO_END_TOKEN_ID),
    )


def _read(inp: Input, reader, kind: str):
    if inp.config is None or inp.config.get("model_type") != kind:
        got = None if inp.config is None else inp.config.get("model_type")
        raise ConfigError(
            f"{inp.model.path} gives a tower, so it must be a {kind} checkpoint; its model_type is {got!r}"
        )
    return reader(inp.config)


def _resolved(recipe: OmniRecipe, inputs: list[Input], v: int, a: int, tok: int, config: OmniConfig) -> OmniRecipe:
    """The recipe with every default replaced by what it resolved to, for the record."""
    return recipe.replace(
        vision=inputs[v].model.path,
        audio=inputs[a].model.path,
        tokenizer=inputs[tok].model.path,
        rope_theta=config.text.rope_full.theta,
        mrope_section=config.text.mrope_section,
        deepstack_visual_indexes=config.vision.deepstack_visual_indexes,
        audio_start_token_id=config.audio_start_token_id,
        audio_end_token_id=config.audio_end_token_id,
    )


def _special_rows(config: OmniConfig, recipe: OmniRecipe, v: int, a: int) -> tuple[tuple[int, int], ...]:
    """(row, input) of the embedding rows each specialist keeps ("specialist" rows), checked against the vocabulary."""
    if recipe.special_token_rows == "average":
        return ()
    vision = (config.vision_start_token_id, config.vision_end_token_id, config.image_token_id, config.video_token_id)
    audio = (config.audio_start_token_id, config.audio_end_token_id, config.audio_token_id)
    rows = tuple((row, v) for row in sorted(set(vision))) + tuple((row, a) for row in sorted(set(audio)))
    outside = [row for row, _ in rows if row >= config.text.vocab_size]
    if outside:
        raise ConfigError(
            f"special token ids {outside} lie outside the {config.text.vocab_size}-row vocabulary; give the audio "
            "delimiters' ids (audio_start_token_id / audio_end_token_id) of this tokenizer"
        )
    return rows


def _backbone(inputs: list[Input], spec: MergeSpec, rows: tuple[tuple[int, int], ...]) -> list[Entry]:
    """The merged text backbone under `language_model.`, in the base's storage order; every input must hold
    the same tensors in the same shapes (LM heads aside)."""
    names = [{n for n in inp.names if n[0] == "backbone" and n[1] != LM_HEAD} for inp in inputs]
    b = spec.base_index
    base = inputs[b]
    differ = [
        f"{name[1]} (in {inputs[i].model.path} only)"
        if name in names[i]
        else f"{name[1]} (missing in {inp.model.path})"
        for i, inp in enumerate(inputs)
        for name in sorted(names[b] ^ names[i])
    ]
    if differ:
        raise ConfigError(f"the text backbones do not hold the same tensors:{listing(differ)}")
    entries, bad = [], []

    def stored(name):
        info = base.reader.info(base.names[name])
        return str(info.file), info.offset

    for name in sorted(names[b], key=stored):
        infos = [inp.reader.info(inp.names[name]) for inp in inputs]
        if len({i.shape for i in infos}) > 1:
            bad.append(f"{name[1]}: " + ", ".join(f"{inp.model.path} {i.shape}" for inp, i in zip(inputs, infos)))
            continue
        if not all(i.dtype in MERGEABLE.values() for i in infos):
            raise ConfigError(
                f"{name[1]} is not a floating-point tensor in every input ({[str(i.dtype) for i in infos]})"
            )
        dtype = np.dtype(MERGEABLE[spec.output_dtype]) if spec.output_dtype else infos[b].dtype
        sources = tuple((i, inp.names[name]) for i, inp in enumerate(inputs))
        special = rows if name[1] == "embed_tokens.weight" else ()
        entries.append(Entry(f"language_model.{name[1]}", infos[b].shape, dtype, sources, True, special))
    if bad:
        raise ConfigError(f"the text backbones' tensors differ in shape (they cannot be averaged):{listing(bad)}")
    return entries


def _towers(inputs: list[Input], towers: list[Layout], v: int, a: int, config: OmniConfig):
    """The carried towers' entries (renamed into the release's layout) and what is left out: LM heads and
    the towers of other inputs. Any other tensor would be lost: refused."""
    carried: list[Entry] = []
    dropped, lost = [], []
    for i, (inp, layout) in enumerate(zip(inputs, towers)):
        for name, key in inp.names.items():
            if name == ("backbone", LM_HEAD):
                dropped.append((inp.model.path, key))  # the Omni model ties its head to the embedding
                continue
            if name[0] == "backbone":
                continue
            where = layout.locate(key)
            if where is None:
                lost.append(f"{key} (in {inp.model.path})")
                continue
            component, rel = where
            if component is AUDIO_PROJECTOR:
                head, _, rest = rel.partition(".")
                rel = f"{_PROJECTOR.get(head, head)}.{rest}"
            target = {VISION: (v, "visual."), AUDIO: (a, "audio_tower."), AUDIO_PROJECTOR: (a, "audio_tower.")}[
                component
            ]
            if i != target[0]:
                dropped.append((inp.model.path, key))  # a tower the composition takes from another input
                continue
            info = inp.reader.info(key)
            carried.append(Entry(target[1] + rel, info.shape, info.dtype, ((i, key),), False))
    if lost:
        raise ConfigError(
            f"tensors outside the text backbone and the towers would be lost:{listing(lost)}\n"
            "--exclude REGEX them to leave them out"
        )
    expected = {"visual." + e.hf_key for e in vision_table(config.vision).entries}
    expected |= {
        "audio_tower." + e.hf_key for t in audio_tables(config.audio, projector_outside=False) for e in t.entries
    }
    got = {e.key for e in carried}
    if got != expected:
        odd = [f"{k} (missing)" for k in sorted(expected - got)] + [f"{k} (unexpected)" for k in sorted(got - expected)]
        raise ConfigError(f"the carried towers do not match their configs:{listing(odd)}")
    return carried, dropped


def _preprocessor(vision: Input, audio: Input) -> dict[str, dict]:
    """`preprocessor_config.json`: the audio input's feature extractor fields, then the vision input's image
    processor fields (theirs win where both name one); `processor_class` left out, neither input's
    processor being the composed model's."""
    composed: dict = {}
    for inp in (audio, vision):
        path = inp.directory / PREPROCESSOR
        if path.is_file():
            try:
                composed.update(json.loads(path.read_text()))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
    composed.pop("processor_class", None)
    return {PREPROCESSOR: composed} if composed else {}


def _or(value: int | None, default: int) -> int:
    return default if value is None else value
