"""Checkpoint directories for the merge tests: tiny transformers layouts filled with seeded numpy tensors."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from bidirlm_jax import cli
from bidirlm_jax.io.shards import INDEX_FILE, ShardReader
from bidirlm_jax.merge import MergeModel, MergeSpec, merge_checkpoints
from bidirlm_jax.testing.tolerance import merge_tol

BF16 = np.dtype(ml_dtypes.bfloat16)
SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)


def hf_template(family: str, **overrides) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """config.json and {key: shape} of a tiny transformers model (built once from its config, no hub)."""
    from bidirlm_jax.testing import reference

    make = reference.qwen3_config if family == "qwen3" else reference.gemma3_config
    config = make(**{**SMALL, **overrides})
    model = reference.build(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # what save_pretrained writes for tied embeddings
    return {**json.loads(config.to_json_string()), "architectures": [type(model).__name__]}, shapes


def write(path: Path, tensors: dict[str, np.ndarray], config: dict | None, *, shards: int = 1) -> Path:
    """A checkpoint directory as transformers writes it: config.json + one file, or shards + index."""
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    keys = list(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def random(
    shapes: dict[str, tuple[int, ...]], seed: int, dtype=np.float32, scale: float = 1.0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s, dtype=np.float32)).astype(dtype) for k, s in shapes.items()}


def tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["merge the base and the encoder"] * 4, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def read(path: Path) -> dict[str, np.ndarray]:
    reader = ShardReader(path)
    return {k: reader.get(k) for k in reader.keys()}


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint8)


def assert_mean(actual, *parts) -> None:
    """`actual` is the float32 average of `parts` (to float32 rounding)."""
    ref = sum(np.asarray(p, np.float64) for p in parts) / len(parts)
    assert (np.abs(np.asarray(actual, np.float64) - ref) <= merge_tol(*parts)).all()


def merge(tmp_path: Path, paths, weights, **kw) -> Path:
    spec = MergeSpec(tuple(MergeModel(str(p), w) for p, w in zip(paths, weights)), **kw)
    return merge_checkpoints(spec, tmp_path / "out", progress=False).out


def run_cli(*args: str) -> int:
    return cli.main(["merge", "--no-progress", *args])


def refused(tmp_path: Path, capsys, *args: str) -> str:
    """`bidirlm merge ARGS` exits 2, writes nothing (no temporary directory either); its message."""
    out = tmp_path / "refused"
    assert run_cli(*args, "--out", str(out)) == 2
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".refused")]
    return capsys.readouterr().err


def vl_key(key: str) -> str:
    return key if key == "lm_head.weight" else "model.language_model." + key.removeprefix("model.")


def vl(path: Path, qwen, seed: int, *, tower_width: int = 32, pos_ids=None) -> Path:
    """A Qwen3-VL-style checkpoint: the text backbone under `model.language_model.`, plus a vision tower."""
    config, shapes = qwen
    text = random(shapes, seed)
    tensors = {vl_key(k): v for k, v in text.items()}
    rng = np.random.default_rng(100 + seed)
    tower = {
        "model.visual.patch_embed.proj.weight": rng.standard_normal((tower_width, 3, 2, 4, 4), dtype=np.float32),
        "model.visual.blocks.0.attn.qkv.weight": rng.standard_normal((3 * tower_width, tower_width), dtype=np.float32),
        "model.visual.merger.linear_fc2.weight": rng.standard_normal((64, tower_width), dtype=np.float32).astype(BF16),
    }
    if pos_ids is not None:
        tower["model.visual.pos_ids"] = pos_ids
    vl_config = {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "text_config": {**config, "model_type": "qwen3_vl_text"},
        "vision_config": {"hidden_size": tower_width},
        "image_token_id": 151655,
    }
    return write(path, {**tensors, **tower}, vl_config)
