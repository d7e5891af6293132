"""`bidirlm embed`, `bidirlm export` and `bidirlm eval`: an encoder's commands, thin runs over the Python API.

Heavy imports happen inside the runs, so `bidirlm --help` stays fast. Outputs are written to a temporary
file and renamed into place (`io.atomic.write_atomically`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bidirlm_jax.cli.checkpoints import format_arg
from bidirlm_jax.cli.inputs import read_items, read_texts
from bidirlm_jax.embed.compose import PROTOCOLS
from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.config import POOLING_MODES
from bidirlm_jax.models.runtime import ATTENTION_MODES, DTYPES
from bidirlm_jax.paths import user_path

# --- embed --------------------------------------------------------------------------------------


def add_embed(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="embed texts, images or audio with an encoder into a .npy file",
        description="Embed every item of INPUT (.txt: one text per line; .jsonl: a `text` field per line, or an "
        "`image` / `audio` path relative to the file, with an optional `text`) with the model in DIR and its "
        "tokenizer; write a float32 [N, d] .npy, row i for line i. Pooling, normalisation and "
        "length default to what an exported encoder declares (mean, normalised, 512 for a plain HF directory).",
    )
    p.add_argument(
        "--model", type=user_path, required=True, metavar="DIR", help="encoder or HF directory, with its tokenizer"
    )
    p.add_argument("--input", type=user_path, required=True, metavar="FILE", help=".txt (one text per line) or .jsonl")
    p.add_argument("--output", type=user_path, required=True, metavar="FILE.npy", help="embeddings [N, d], float32")
    p.add_argument("--instruction", help="query instruction: each text becomes 'Instruct: TEXT\\nQuery: {text}'")
    p.add_argument(
        "--prompt-name",
        help="prepend the encoder's sentence-transformers prompt of this name (default: its default_prompt_name)",
    )
    _encoding_args(p)
    p.add_argument("--text-field", default="text", help="the .jsonl field holding the text (default text)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE.npy if it exists")
    return p


def run_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from bidirlm_jax.data.media.items import checkpoint_processor
    from bidirlm_jax.embed.encode import encode_texts
    from bidirlm_jax.io.atomic import check_destination, write_atomically

    items, wheres = read_items(args.input, text_field=args.text_field)
    check_destination(args.output, overwrite=args.overwrite)
    media = any(not isinstance(i, str) for i in items)
    model, tokenizer, settings = _load(args, towers=media)
    prompt = named_prompt(args.prompt_name, settings, instruction=args.instruction)
    tokenizer = checkpoint_processor(args.model, model, tokenizer)  # a model with towers: its processor
    result = encode_texts(
        model,
        tokenizer,
        [prompt + i if isinstance(i, str) else i for i in items],  # prompts go on texts, never on media
        item_names=wheres,
        instruction=args.instruction,
        pooling=chosen(args.pooling, settings, "pooling"),
        normalize=settings.normalize,
        batch_size=args.batch_size,
        max_length=chosen(args.max_length, settings, "max_length"),
        progress=False if args.no_progress else None,
    )
    write_atomically(args.output, lambda f: np.save(f, result.embeddings))
    n, d = result.embeddings.shape
    truncated = f"; {result.num_truncated} truncated to the maximum length" if result.num_truncated else ""
    resized = f"; {result.num_downscaled} images scaled down to the pixel budget" if result.num_downscaled else ""
    cut = f"; {result.num_audio_truncated} clips cut to the maximum duration" if result.num_audio_truncated else ""
    print(f"embedded {n} {'items' if media else 'texts'} ({d} dimensions){truncated}{resized}{cut} -> {args.output}")
    return 0


def named_prompt(name: str | None, settings: Any, *, instruction: str | None = None) -> str:
    """The text sentence-transformers would prepend: the prompt `name`, else the encoder's default prompt
    (none when an instruction is given); `--prompt-name` with `--instruction` is refused."""
    if name is not None and instruction:
        raise ConfigError("give --prompt-name or --instruction, not both (each is a prefix of every text)")
    if name is None:  # the default prompt (sentence-transformers drops empty prompts, as `settings` does)
        return "" if instruction else settings.prompts.get(settings.default_prompt_name, "")
    if name not in settings.prompts:
        known = ", ".join(sorted(settings.prompts)) or "none"
        raise ConfigError(f"no prompt named {name!r} in {settings.origin or 'this model'} (its prompts: {known})")
    return settings.prompts[name]


# --- export -------------------------------------------------------------------------------------


def add_export(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="HF directory or checkpoint -> encoder loadable by transformers and sentence-transformers",
        description="Write SRC (an HF directory, a merged one, a bidirlm checkpoint or a training run, with its tokenizer) as an "
        "encoder directory DST that transformers (AutoModel) and sentence-transformers (SentenceTransformer) load "
        "as-is, without remote code (--format bidirlm: as the released BidirLM models load, with theirs). Written to a "
        "temporary directory and renamed into place.",
    )
    p.add_argument("src", type=user_path, help="HF directory or bidirlm checkpoint, with its tokenizer files")
    p.add_argument("dst", type=user_path, help="output directory (must not exist, unless --overwrite)")
    p.add_argument(
        "--pooling", choices=POOLING_MODES, help="pooling used in training (default: a run's or encoder's, else mean)"
    )
    p.add_argument("--no-normalize", dest="normalize", action="store_false", help="no L2 normalisation module")
    p.add_argument(
        "--max-length", type=int, help="sentence-transformers' max_seq_length (default: a run's data.seq_len, else 512)"
    )
    p.add_argument("--instruction", help="default query instruction, saved as the 'query' prompt")
    p.add_argument("--attention", choices=ATTENTION_MODES, default="bidirectional", help="(default bidirectional)")
    p.add_argument("--dtype", choices=DTYPES, help="stored precision (default: the source's)")
    format_arg(p)
    p.add_argument("--allow-pickle", action="store_true", help="read pytorch_model.bin (only from sources you trust)")
    p.add_argument(
        "--lora",
        choices=("merge", "peft"),
        default="merge",
        help="a LoRA run: merge the adapters into the weights (default) or write them alone in PEFT's adapter "
        "format (adapter_config.json, adapter_model.safetensors) for the base's transformers model",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def run_export(args: argparse.Namespace) -> int:
    from bidirlm_jax.io.heads import export_finetuned
    from bidirlm_jax.io.omni_export import OMNI_MAX_LENGTH, export_omni, is_omni_dir
    from bidirlm_jax.io.run import head_file
    from bidirlm_jax.io.sentence_transformers import export_encoder, read_encoder_settings

    if args.lora == "peft":
        print(f"wrote {_export_peft(args.src, args.dst, overwrite=args.overwrite)}")
        return 0
    if head_file(args.src).is_file():  # a fine-tuning run: its head's export (io.heads)
        out = export_finetuned(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, format=args.format)
        print(f"wrote {out}")
        return 0
    settings = read_encoder_settings(args.src)
    if is_omni_dir(args.src):  # the released BidirLM-Omni layout (remote code named in auto_map)
        out = export_omni(
            args.src,
            args.dst,
            max_length=args.max_length or OMNI_MAX_LENGTH,
            prompts=_prompts(args.instruction, settings),
            dtype=args.dtype,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
        )
        print(f"wrote {out}")
        return 0
    out = export_encoder(
        args.src,
        args.dst,
        pooling=chosen(args.pooling, settings, "pooling"),
        normalize=args.normalize,
        max_length=chosen(args.max_length, settings, "max_length"),
        prompts=_prompts(args.instruction, settings),
        attention=args.attention,
        dtype=args.dtype,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        format=args.format,
    )
    print(f"wrote {out}")
    return 0


def _export_peft(run: Path, dst: Path, *, overwrite: bool) -> Path:
    """A LoRA run's latest adapters in PEFT's format, for the base it adapts (`io.lora.save_peft`)."""
    from bidirlm_jax.io.hf import load_adapted
    from bidirlm_jax.io.hf_config import read_runtime
    from bidirlm_jax.io.lora import base_of, read_record, save_peft, settings
    from bidirlm_jax.io.run import head_file, is_training_run, model_dir

    record = read_record(run) if is_training_run(run) else None
    if record is None:
        raise ConfigError(f"{run} is not a LoRA training run (no model/lora.json); --lora peft exports those")
    if head_file(run).is_file():
        raise ConfigError(
            f"{run} is a fine-tuning run: PEFT's format here holds the backbone's adapters, not the task head; "
            "export it merged (--lora merge)"
        )
    model = load_adapted(run, read_runtime(model_dir(run)))
    return save_peft(model, settings(record), dst, base=str(base_of(run)), overwrite=overwrite)


# --- eval ---------------------------------------------------------------------------------------


def add_eval(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="retrieval (BEIR layout) and MTEB scores of an encoder",
        description="Score the model in DIR on local retrieval data in the BEIR layout (nDCG@10, MRR@10, "
        "Recall@100; lines may hold image or audio paths, for a model with towers), on MTEB, MIEB and MAEB tasks "
        "whose data is available locally (through the adapter, with BidirLM's instructions) and, for MNTP "
        "checkpoints, by masked-token accuracy and loss on held-out text. Prints a "
        "table; --output writes the results as JSON.",
    )
    p.add_argument(
        "--model", type=user_path, required=True, metavar="DIR", help="encoder or HF directory, with its tokenizer"
    )
    p.add_argument(
        "--beir", type=user_path, action="append", default=[], metavar="DIR", help="BEIR-layout directory (repeat)"
    )
    p.add_argument("--mteb", action="append", default=[], metavar="TASK", help="MTEB task name (repeat)")
    p.add_argument(
        "--mntp-text", type=user_path, metavar="FILE", help="held-out .txt/.jsonl: MNTP masked accuracy and loss"
    )
    p.add_argument("--mask-ratio", type=float, default=0.3, help="MNTP masking probability (default 0.3)")
    p.add_argument("--mask-token", default="auto", help="MNTP mask token or id (default: the tokenizer's)")
    p.add_argument("--split", default="test", help="qrels split of the BEIR directories (default test)")
    p.add_argument("--instruction", help="query instruction for the BEIR directories (default: none)")
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="sum",
        help="composed inputs (media with text): sum of per-modality embeddings (the release's, default) or joint",
    )
    _encoding_args(p)
    p.add_argument(
        "--mteb-cache", type=user_path, metavar="DIR", help="mteb's result cache (default: none, always recompute)"
    )
    p.add_argument("--output", type=user_path, metavar="FILE.json", help="write the results here (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE.json if it exists")
    return p


def run_eval(args: argparse.Namespace) -> int:
    from bidirlm_jax.data.media.items import checkpoint_processor
    from bidirlm_jax.embed.compose import require_modalities
    from bidirlm_jax.evals.retrieval import evaluate_retrieval, load_beir
    from bidirlm_jax.io.atomic import check_destination, write_atomically

    if not args.beir and not args.mteb and not args.mntp_text:
        raise ConfigError(
            "nothing to evaluate: give --beir DIR (local BEIR-layout data), --mteb TASK or --mntp-text FILE"
        )
    if args.output:
        check_destination(args.output, overwrite=args.overwrite)
    data = {path: load_beir(path, args.split) for path in args.beir}  # bad inputs fail before the model loads
    held_out = read_texts(args.mntp_text) if args.mntp_text else None
    tasks: list[Any] = []
    if args.mteb:
        from bidirlm_jax.evals.mteb import MTEBEncoder, load_task, run_mteb

        tasks = [load_task(name) for name in args.mteb]
    inputs = {f"BEIR directory {p}": {m for side in d.modalities() for m in side} for p, d in data.items()}
    inputs |= {f"mteb task {task.metadata.name}": set(task.metadata.modalities) for task in tasks}
    model, tokenizer, settings = _load(args, towers=any(m != "text" for needed in inputs.values() for m in needed))
    for what, needed in inputs.items():  # before anything is encoded
        require_modalities(model, needed, what)
    processor = checkpoint_processor(args.model, model, tokenizer)  # a model with towers: its processor
    pooling, max_length = chosen(args.pooling, settings, "pooling"), chosen(args.max_length, settings, "max_length")
    results: dict[str, Any] = {"model": str(args.model), "retrieval": {}, "mteb": {}, "mntp": {}}
    for path, split_data in data.items():
        results["retrieval"][str(path)] = evaluate_retrieval(
            model,
            processor,
            split_data,
            instruction=args.instruction,
            pooling=pooling,
            batch_size=args.batch_size,
            max_length=max_length,
            progress=False if args.no_progress else None,
            protocol=args.protocol,
        )
    if tasks:
        encoder = MTEBEncoder.from_loaded(
            args.model,
            model,
            processor,
            pooling=pooling,
            normalize=settings.normalize,
            batch_size=args.batch_size,
            max_length=max_length,
            protocol=args.protocol,
        )
        results["mteb"] = run_mteb(encoder, tasks, cache_dir=args.mteb_cache)
        results["mteb_model"] = {"name": encoder.mteb_model_meta.name, "revision": encoder.mteb_model_meta.revision}
    if held_out is not None:
        from bidirlm_jax.evals.lm import evaluate_mntp

        results["mntp"][str(args.mntp_text)] = evaluate_mntp(
            model,
            tokenizer,
            held_out,
            mask_ratio=args.mask_ratio,
            mask_token=args.mask_token,
            max_length=max_length,
            batch_size=args.batch_size,
        )
    print(format_table(results))
    if args.output:
        write_atomically(args.output, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


def format_table(results: dict[str, Any]) -> str:
    """A table per kind of result: retrieval metrics, MTEB main scores, MNTP accuracy and loss."""
    tables = []
    if results["retrieval"]:
        rows = [("retrieval", "nDCG@10", "MRR@10", "Recall@100", "queries")]
        rows += [
            (
                name,
                f"{m['ndcg_at_10']:.4f}",
                f"{m['mrr_at_10']:.4f}",
                f"{m['recall_at_100']:.4f}",
                str(m["num_queries"]),
            )
            for name, m in results["retrieval"].items()
        ]
        tables.append(rows)
    if results["mteb"]:
        tables.append(
            [("mteb task", "main score")] + [(n, f"{m['main_score']:.4f}") for n, m in results["mteb"].items()]
        )
    if results["mntp"]:
        rows = [("mntp held-out text", "masked accuracy", "loss", "masked tokens")]
        rows += [
            (name, f"{m['masked_accuracy']:.4f}", f"{m['loss']:.4f}", str(m["masked_tokens"]))
            for name, m in results["mntp"].items()
        ]
        tables.append(rows)
    return "\n\n".join(_aligned(rows) for rows in tables)


def _aligned(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# --- shared -------------------------------------------------------------------------------------


def _encoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pooling", choices=POOLING_MODES, help="default: the encoder's (mean for a plain HF directory)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per batch (default 32)")
    p.add_argument("--max-length", type=int, help="tokens per text, longer ones truncated (default: the encoder's)")
    p.add_argument("--attention", choices=ATTENTION_MODES, help="default: what the model's config.json says")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _prompts(instruction: str | None, settings: Any) -> dict[str, str]:
    """The prompts the run or encoder recorded (a contrastive run: its datasets' query prefixes), with
    `--instruction` as the `query` prompt; one that replaces a recorded `query` prompt is warned of."""
    from bidirlm_jax.embed.encode import query_prompt

    prompts = dict(settings.prompts)
    if instruction:
        query = query_prompt(instruction)
        if prompts.get("query", query) != query:
            print(
                f"warning: --instruction replaces the query prompt {prompts['query']!r} recorded by {settings.origin}",
                file=sys.stderr,
            )
        prompts["query"] = query
    return prompts


def chosen(flag: Any, settings: Any, name: str) -> Any:
    """A flag's value, else what the run or encoder recorded; a flag that disagrees with a record is warned of."""
    recorded = getattr(settings, name)
    if flag is None:
        return recorded
    if settings.origin and flag != recorded:
        option = "--" + name.replace("_", "-")
        print(
            f"warning: {option} {flag} disagrees with {name}={recorded} recorded by {settings.origin}; using {flag}",
            file=sys.stderr,
        )
    return flag


def _load(args: argparse.Namespace, *, towers: bool = False):
    from bidirlm_jax.io.sentence_transformers import load_encoder

    return load_encoder(args.model, attention=args.attention, dtype=args.dtype, towers=towers)
