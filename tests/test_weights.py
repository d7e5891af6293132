"""io.layouts and io.weights: each component's prefix is detected on its own, and any component's weight table
loads and saves through the generic code (a tower adds a table, not a loader); from_pretrained's dispatch."""

import json

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from bidirlm_jax.errors import CheckpointError
from bidirlm_jax.io.layouts import HEAD, LM_HEAD, TEXT, Component, Layout, detect_layout
from bidirlm_jax.io.shards import ShardReader
from bidirlm_jax.io.sources import Source, source_of
from bidirlm_jax.io.weights.load import load_state, read_tables
from bidirlm_jax.io.weights.save import write_tables
from bidirlm_jax.io.weights.table import Table, entry

# The towers' components as omni-notes §2.6 lays them out (the tower modules declare their own).
VISUAL = Component("visual", ("model.visual.", "visual."), "patch_embed.proj.weight")
AUDIO = Component("audio_tower", ("thinker.audio_tower.", "model.audio_tower.", "audio_tower."), "conv2d1.weight")
ALL = (TEXT, HEAD, VISUAL, AUDIO)


def _keys(text: str, head: str | None, visual: str | None = None, audio: str | None = None) -> dict[str, Component]:
    """A checkpoint's keys, each with the component it was written for."""
    keys = {f"{text}{k}": TEXT for k in ("embed_tokens.weight", "layers.0.mlp.up_proj.weight", "norm.weight")}
    keys |= {f"{head}{LM_HEAD}": HEAD} if head is not None else {}
    keys |= {f"{visual}{k}": VISUAL for k in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight")} if visual else {}
    keys |= {f"{audio}{k}": AUDIO for k in ("conv2d1.weight", "layers.0.fc1.weight")} if audio else {}
    return keys


@pytest.mark.parametrize(
    "text, head, visual, audio",
    [
        ("model.", "", None, None),  # causal LM
        ("", "", None, None),  # bare backbone with a head beside it
        ("model.language_model.", None, "model.visual.", None),  # Qwen3-VL (tied)
        ("language_model.model.", "language_model.", None, None),  # Gemma3 multimodal, first layout
        ("thinker.model.", "thinker.", None, "thinker.audio_tower."),  # Qwen3-ASR original
        ("model.language_model.", "", None, "model.audio_tower."),  # Qwen3-ASR -hf
        ("language_model.", None, "visual.", "audio_tower."),  # BidirLM-Omni
    ],
)
def test_each_component_finds_its_prefix(text, head, visual, audio):
    keys = _keys(text, head, visual, audio)
    layout = detect_layout(keys, ALL)
    assert [layout.prefix(c) for c in ALL] == [text, head, visual, audio]
    for key, written_for in keys.items():  # every key lands in its component, relative to its prefix
        component, rel = layout.locate(key)
        assert component == written_for, key
        assert layout.key(component, rel) == key
    # the text view the merge uses: towers are outside the backbone
    assert {layout.to_canonical(k) for k in keys} - {None} == {
        "embed_tokens.weight",
        "layers.0.mlp.up_proj.weight",
        "norm.weight",
    } | ({LM_HEAD} if head is not None else set())


def test_a_checkpoint_without_a_text_backbone_is_refused_but_towers_alone_are_found():
    with pytest.raises(CheckpointError, match="cannot find a text backbone"):
        detect_layout(["visual.patch_embed.proj.weight"])
    assert detect_layout(["visual.patch_embed.proj.weight"], (VISUAL,)).prefix(VISUAL) == "visual."


class Toy(nnx.Module):
    """A stand-in tower: a patch embedding stored flattened ([out, C·ph·pw]) and a bias."""

    def __init__(self, rngs: nnx.Rngs):
        self.patch = nnx.Param(nnx.initializers.normal()(rngs.params(), (4, 6)))
        self.bias = nnx.Param(np.zeros(4, np.float32))


def toy_table() -> Table:
    return Table(
        VISUAL,
        (
            entry(("patch",), "patch_embed.proj.weight", (4, 3, 1, 2), (4, 6)),  # a Conv kernel seen as a matrix
            entry(("bias",), "patch_embed.proj.bias", (4,)),
        ),
    )


def _checkpoint(path, tensors):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return ShardReader(path)


def test_a_component_table_loads_and_saves_through_the_generic_code(tmp_path):
    rng = np.random.default_rng(0)
    kernel, bias = rng.standard_normal((4, 3, 1, 2), np.float32), rng.standard_normal(4, dtype=np.float32)
    text = {k: np.ones(2, np.float32) for k in _keys("model.language_model.", "")}
    reader = _checkpoint(
        tmp_path / "vl",
        {**text, "model.visual.patch_embed.proj.weight": kernel, "model.visual.patch_embed.proj.bias": bias},
    )
    layout = detect_layout(reader.keys(), (VISUAL,))
    abstract = nnx.split(nnx.eval_shape(lambda: Toy(nnx.Rngs(0))))
    toy = load_state(abstract, reader, layout, [toy_table()], dtype="float32")
    np.testing.assert_array_equal(toy.patch[...], kernel.reshape(4, 6))
    np.testing.assert_array_equal(toy.bias[...], bias)

    omni = Layout(((VISUAL, "visual."),))  # written in another layout: the keys move, the values do not
    (tmp_path / "out").mkdir()
    specs = write_tables(tmp_path / "out", toy, omni, [toy_table()], dtype=np.dtype(np.float32))
    assert [s.name for s in specs] == ["visual.patch_embed.proj.weight", "visual.patch_embed.proj.bias"]
    written = ShardReader(tmp_path / "out")
    np.testing.assert_array_equal(written.get("visual.patch_embed.proj.weight"), kernel)
    np.testing.assert_array_equal(written.get("visual.patch_embed.proj.bias"), bias)


def test_a_table_placed_inside_a_larger_model_prefixes_its_paths():
    inner = toy_table().under("visual")
    assert [e.path for e in inner.entries] == [("visual", "patch"), ("visual", "bias")]
    assert [e.hf_key for e in inner.entries] == [e.hf_key for e in toy_table().entries]


def test_a_component_reports_its_missing_unexpected_and_misshaped_tensors(tmp_path):
    base = {"visual.patch_embed.proj.weight": np.zeros((4, 3, 1, 2), np.float32)}
    reader = _checkpoint(tmp_path / "a", {**base, "visual.extra.weight": np.zeros(1, np.float32)})
    layout = detect_layout(reader.keys(), (VISUAL,))
    with pytest.raises(CheckpointError, match=r"missing tensors \['patch_embed.proj.bias'\].*unexpected tensors"):
        list(read_tables(reader, layout, [toy_table()]))
    reader = _checkpoint(tmp_path / "b", {**base, "visual.patch_embed.proj.bias": np.zeros(5, np.float32)})
    with pytest.raises(CheckpointError, match=r"visual.patch_embed.proj.bias: \(5,\) but config.json needs \(4,\)"):
        list(read_tables(reader, detect_layout(reader.keys(), (VISUAL,)), [toy_table()]))


def test_tables_must_name_every_parameter(tmp_path):
    reader = _checkpoint(tmp_path / "a", {"visual.patch_embed.proj.weight": np.zeros((4, 3, 1, 2), np.float32)})
    partial = Table(VISUAL, toy_table().entries[:1])
    abstract = nnx.split(nnx.eval_shape(lambda: Toy(nnx.Rngs(0))))
    with pytest.raises(ValueError, match="do not name the parameters.*bias"):
        load_state(abstract, reader, detect_layout(reader.keys(), (VISUAL,)), [partial], dtype="float32")


def test_what_a_directory_holds(tmp_path):
    hf, ckpt, run, finetune = (tmp_path / n for n in ("hf", "ckpt", "run", "finetune"))
    hf.mkdir()
    (ckpt / "params").mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    for r in (run, finetune):
        (r / "checkpoints").mkdir(parents=True)
        (r / "model").mkdir()
        (r / "model" / "config.json").write_text("{}")
    (finetune / "model" / "head.json").write_text(json.dumps({"head": {}}))
    assert [source_of(p) for p in (hf, ckpt, run, finetune)] == [
        Source.HF,
        Source.CHECKPOINT,
        Source.RUN,
        Source.FINETUNE_RUN,
    ]
