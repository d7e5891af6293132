"""`bidirlm convert` and `bidirlm merge`: checkpoints in, checkpoints out."""

from __future__ import annotations

import argparse

from bidirlm_jax.io import EXPORT_FORMATS, FORMATS
from bidirlm_jax.models.runtime import ATTENTION_MODES, BIDIRECTIONAL_WINDOWS, DTYPES
from bidirlm_jax.paths import user_path


def add_convert(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="HF directory <-> bidirlm checkpoint",
        description="Convert a Hugging Face model directory into a bidirlm (orbax) checkpoint, or back. "
        "The output is written to a temporary directory and renamed into place.",
    )
    p.add_argument("src", type=user_path, help="HF directory (config.json + safetensors) or bidirlm checkpoint")
    p.add_argument("dst", type=user_path, help="output directory (must not exist, unless --overwrite)")
    p.add_argument("--to", choices=FORMATS, help="output format (default: the other one)")
    p.add_argument("--attention", choices=ATTENTION_MODES, help="attention mode to record (default: SRC's)")
    p.add_argument(
        "--bidirectional-window", choices=BIDIRECTIONAL_WINDOWS, help="Gemma3 sliding layers when bidirectional"
    )
    p.add_argument("--dtype", choices=DTYPES, help="stored dtype of an HF output")
    format_arg(p)
    p.add_argument("--max-shard-size", default="5GB", help="largest HF output shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument(
        "--allow-pickle", action="store_true", help="read pytorch_model.bin (pickle; only from sources you trust)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def format_arg(p: argparse.ArgumentParser) -> None:
    """`--format`: which HF format an output is written in (`convert`, `export`)."""
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="transformers",
        help="HF output: transformers' own classes (default), or a released BidirLM checkpoint (model_type bidirlm, "
        "its remote code named by auto_map; bidirectional text models)",
    )


def run_convert(args: argparse.Namespace) -> int:
    from bidirlm_jax.io.conversion import convert
    from bidirlm_jax.io.shards import parse_size

    out = convert(
        args.src,
        args.dst,
        to=args.to,
        attention=args.attention,
        bidirectional_window=args.bidirectional_window,
        dtype=args.dtype,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        max_shard_bytes=parse_size(args.max_shard_size),
        format=args.format,
    )
    print(f"wrote {out}")
    return 0


def add_merge(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="linearly merge checkpoints (θ = Σ wᵢθᵢ / Σ wᵢ), streaming from disk",
        description="Linearly merge checkpoints that share a text backbone (mergekit `linear`), tensor by tensor. "
        "The base model (default: the first) gives the output its key layout, config, tokenizer, other files and "
        "the tensors only it has (vision/audio towers).",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH=WEIGHT",
        help="a checkpoint directory and its weight (repeat)",
    )
    p.add_argument(
        "--config",
        type=user_path,
        metavar="FILE.yaml",
        help="a mergekit `merge_method: linear` recipe instead of --model",
    )
    p.add_argument(
        "--out",
        type=user_path,
        required=True,
        metavar="DIR",
        help="output directory (must not exist, unless --overwrite)",
    )
    p.add_argument(
        "--base", metavar="PATH", help="the model whose layout, config, tokenizer and extra tensors the output takes"
    )
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument(
        "--no-normalize", dest="normalize", action="store_false", default=None, help="Σ wᵢθᵢ without dividing by Σ wᵢ"
    )
    p.add_argument(
        "--out-dtype", choices=DTYPES, help="dtype of merged tensors (default: the recipe's `dtype`, else the base's)"
    )
    p.add_argument(
        "--mergekit-arithmetic",
        dest="arithmetic",
        action="store_const",
        const="mergekit",
        help="replay mergekit's arithmetic bit for bit (inputs rounded to the recipe's `dtype` first) "
        "instead of one float32 rounding from the stored values",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="keys not merged: the base's are kept, others dropped",
    )
    p.add_argument(
        "--key-pattern",
        action="append",
        default=[],
        metavar="PATH=REGEX",
        help="regex whose group is the backbone-relative key of PATH's tensors",
    )
    p.add_argument("--attention", choices=ATTENTION_MODES, help="attention mode written to the output's config")
    p.add_argument(
        "--bidirectional-window", choices=BIDIRECTIONAL_WINDOWS, help="Gemma3 sliding layers when bidirectional"
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model.bin inputs (pickle; only from sources you trust)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    omni = p.add_argument_group(
        "BidirLM-Omni composition",
        "write a bidirlm_omni checkpoint: backbones merged, the vision tower carried from a Qwen3-VL input and "
        "the audio tower from a Qwen3-ASR input (any of these flags turns it on; the YAML's bidirlm.compose)",
    )
    omni.add_argument("--compose-omni", action="store_true", help="compose with every setting at its default")
    omni.add_argument("--vision-from", metavar="PATH", help="the input whose vision tower is carried")
    omni.add_argument("--audio-from", metavar="PATH", help="the input whose audio tower is carried")
    omni.add_argument("--tokenizer-from", metavar="PATH", help="the input whose tokenizer travels (default: audio's)")
    omni.add_argument("--rope-theta", type=float, help="the output's rope θ (default: the vision input's)")
    omni.add_argument("--mrope-section", metavar="T,H,W", help="the output's M-RoPE sections (default: vision's)")
    omni.add_argument("--deepstack", metavar="I,J,K", help="the vision tower's DeepStack taps (default: its own)")
    omni.add_argument(
        "--specialist-rows",
        dest="special_token_rows",
        action="store_const",
        const="specialist",
        help="take the vision and audio tokens' embedding rows from their specialists instead of averaging them",
    )
    return p


def _compose_settings(args: argparse.Namespace) -> dict | None:
    """The composition flags given (None when none is: a plain merge, unless the YAML composes)."""
    settings = {
        "vision": args.vision_from,
        "audio": args.audio_from,
        "tokenizer": args.tokenizer_from,
        "rope_theta": args.rope_theta,
        "mrope_section": args.mrope_section,
        "deepstack_visual_indexes": args.deepstack,
        "special_token_rows": args.special_token_rows,
    }
    if args.compose_omni or any(v is not None for v in settings.values()):
        return settings
    return None


def run_merge(args: argparse.Namespace) -> int:
    from bidirlm_jax import merge  # imported here so that `bidirlm --help` stays fast
    from bidirlm_jax.io.shards import parse_size

    spec = merge.spec_from_args(
        models=args.model,
        config=args.config,
        base=args.base,
        normalize=args.normalize,
        out_dtype=args.out_dtype,
        exclude=args.exclude,
        key_patterns=args.key_pattern,
        attention=args.attention,
        bidirectional_window=args.bidirectional_window,
        arithmetic=args.arithmetic,
        compose=_compose_settings(args),
    )
    result = merge.merge_checkpoints(
        spec,
        args.out,
        overwrite=args.overwrite,
        max_shard_bytes=parse_size(args.max_shard_size),
        progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
    )
    print(
        f"merged {len(result.merged)} tensors, carried {len(result.carried)} "
        f"{'(towers)' if spec.compose else 'from the base'}, dropped {len(result.dropped)} -> {result.out}"
    )
    return 0
