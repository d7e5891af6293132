"""The AuT audio tower's weight tables: `audio_tower.*` ↔ `AudioEncoder` (unrolled), and its projector.

Every entry is a reshape: our parameters keep torch's `[out, in]` order (conv kernels OIHW), with the
attention heads split out. The original Qwen3-ASR and BidirLM-Omni keep the projector inside the tower
(`proj1`, `proj2`); transformers' Qwen3-ASR-hf moves it out, as `multi_modal_projector.linear_{1,2}`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from bidirlm_jax.io.layouts import AUDIO, AUDIO_PROJECTOR, Layout
from bidirlm_jax.io.weights.load import TensorDict, load_state
from bidirlm_jax.io.weights.table import Table, entry
from bidirlm_jax.io.weights.text import text_tables
from bidirlm_jax.models.towers.qwen3_asr.config import AudioConfig, Qwen3ASRConfig
from bidirlm_jax.models.towers.qwen3_asr.encoder import AudioEncoder
from bidirlm_jax.models.transformer import stack_layers


def audio_tables(config: AudioConfig, *, projector_outside: bool) -> tuple[Table, ...]:
    """The tower's table, plus the projector's own table when `projector_outside` (the -hf layout)."""
    d, f, c, h, hd = (
        config.d_model,
        config.encoder_ffn_dim,
        config.downsample_hidden_size,
        config.encoder_attention_heads,
        config.head_dim,
    )
    tower, projector = [], []

    def dense(rows, path, key, hf_out, hf_in, out=None, inner=None, bias=None):
        """A linear map at `path` and its bias beside it (named `bias`, default `<name>_bias`)."""
        rows.append(entry(path, f"{key}.weight", (hf_out, hf_in), (*(out or (hf_out,)), *(inner or (hf_in,)))))
        rows.append(entry((*path[:-1], bias or f"{path[-1]}_bias"), f"{key}.bias", (hf_out,), out))

    def norm(path, key):
        tower.extend(entry((*path, w), f"{key}.{w}", (d,)) for w in ("weight", "bias"))

    for i, channels in enumerate((1, c, c), start=1):
        tower.append(entry(("stem", f"conv2d{i}", "weight"), f"conv2d{i}.weight", (c, channels, 3, 3)))
        tower.append(entry(("stem", f"conv2d{i}", "bias"), f"conv2d{i}.bias", (c,)))
    tower.append(
        entry(("stem", "conv_out"), "conv_out.weight", (d, config.stem_features), (d, c, config.stem_features // c))
    )
    for i in range(config.encoder_layers):
        layer, key = ("layers", i), f"layers.{i}"
        for name in ("q", "k", "v"):
            attn = (*layer, "self_attn", f"{name}_proj")
            dense(tower, attn, f"{key}.self_attn.{name}_proj", d, d, out=(h, hd), bias=f"{name}_bias")
        attn = (*layer, "self_attn", "out_proj")
        dense(tower, attn, f"{key}.self_attn.out_proj", d, d, inner=(h, hd), bias="out_bias")
        norm((*layer, "self_attn_layer_norm"), f"{key}.self_attn_layer_norm")
        norm((*layer, "final_layer_norm"), f"{key}.final_layer_norm")
        dense(tower, (*layer, "fc1"), f"{key}.fc1", f, d)
        dense(tower, (*layer, "fc2"), f"{key}.fc2", d, f)
    norm(("ln_post",), "ln_post")
    rows, names = (projector, ("linear_1", "linear_2")) if projector_outside else (tower, ("proj1", "proj2"))
    dense(rows, ("proj1",), names[0], d, d)
    dense(rows, ("proj2",), names[1], config.output_dim, d)
    tables = (Table(AUDIO, tuple(tower)),)
    return (*tables, Table(AUDIO_PROJECTOR, tuple(projector))) if projector_outside else tables


def qwen3_asr_tables(config: Qwen3ASRConfig, *, projector_outside: bool = True) -> tuple[Table, ...]:
    """Every parameter of an unrolled `Qwen3ASR(config)`: the text tables under `text`, the tower's (and
    with `projector_outside`, the -hf layout, its projector's) under `audio_tower`."""
    text = tuple(t.under("text") for t in text_tables(config.text))
    return text + tuple(t.under("audio_tower") for t in audio_tables(config.audio, projector_outside=projector_outside))


def load_audio_tower(encoder: AudioEncoder, tensors: Mapping[str, np.ndarray], prefix: str = "audio_tower.") -> None:
    """Set every parameter of `encoder` (in place) from a state dict's tower tensors under `prefix`, projector
    inside (the original Qwen3-ASR and BidirLM-Omni layouts); the tensors there must be exactly the table's."""
    runtime = encoder.runtime
    unrolled = runtime.replace(scan_layers=False)
    abstract = nnx.split(nnx.eval_shape(lambda: AudioEncoder(encoder.config, unrolled, rngs=nnx.Rngs(0))))
    tables = audio_tables(encoder.config, projector_outside=False)
    layout = Layout(((AUDIO, prefix),))
    loaded = load_state(abstract, TensorDict(tensors), layout, tables, dtype=runtime.param_dtype)
    state = nnx.state(loaded)
    nnx.update(encoder, stack_layers(state) if runtime.scan_layers else state)
