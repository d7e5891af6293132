"""The training engine's configuration: defaults every `configs/*.py` file starts from, and checks.

Configs are ml_collections `ConfigDict`s (as in big_vision) so that `--config.key=value` overrides work
from the command line and unknown keys are refused. `model.*` placeholders override single fields of
the preset (or of the `init_from` checkpoint's config) without a new preset.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from pathlib import Path
from typing import Any

from absl import flags
from ml_collections import ConfigDict, config_dict, config_flags

from bidirlm_jax.errors import ConfigError
from bidirlm_jax.models.lora import LoRAConfig
from bidirlm_jax.models.runtime import DEFAULT_RUNTIME, TRAIN_KEYS, Runtime
from bidirlm_jax.paths import expand_user
from bidirlm_jax.sharding import LOGICAL_RULES, make_rules

_MODEL_OVERRIDES = {
    "vocab_size": int,
    "hidden_size": int,
    "intermediate_size": int,
    "num_layers": int,
    "num_heads": int,
    "num_kv_heads": int,
    "head_dim": int,
}


def base_config() -> ConfigDict:
    """Engine defaults: AdamW + WSD, one data-parallel mesh over all devices, fp32."""
    c = ConfigDict()
    c.objective = "causal_lm"
    c.model = ConfigDict(
        dict(
            preset="tiny-qwen3",
            init_from="",  # an HF checkpoint directory; empty = random init from `preset`
            towers=False,  # train with the vision/audio towers init_from holds (media data); tiny-qwen3-vl/-asr have them
            # The run settings, as models.runtime.Runtime declares them (master weights and the loss stay fp32).
            **{key: getattr(DEFAULT_RUNTIME, key) for key in TRAIN_KEYS},
            **{k: config_dict.placeholder(t) for k, t in _MODEL_OVERRIDES.items()},
        )
    )
    c.data = ConfigDict(
        dict(
            source="synthetic",  # the objective's: synthetic | npy (token ids) | text | stdlib | pairs
            path="",
            tokenizer="",  # tokenizer directory (default: model.init_from's)
            text_field="text",  # .jsonl field / .parquet column holding the text
            mixture="",  # text objectives: "NAME:WEIGHT:PATH;..." weighted sources instead of data.path
            seq_len=64,
            global_batch_size=8,
            seed=0,
            synthetic_tokens=200_000,
            read_threads=2,
            prefetch=4,
        )
    )
    c.optim = ConfigDict(
        dict(
            learning_rate=3e-4,
            schedule="wsd",  # wsd | linear | constant
            warmup_steps=10,
            decay_fraction=0.2,
            decay_shape="linear",  # linear | cosine | 1-sqrt (wsd only)
            final_lr_fraction=0.0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            grad_clip_norm=1.0,  # <= 0 disables clipping
            trainable=(),  # regexes on parameter paths (layers/0/mlp/up_proj); only matching ones train (): all
            frozen=(),  # regexes of parameters kept as they are: no update, no optimizer state
        )
    )
    # LoRA (train.lora): rank > 0 trains low-rank adapters on `targets` (and a task head); the base stays frozen
    c.lora = ConfigDict(
        dict(
            rank=0,  # 0: off (every parameter trains, as `optim.trainable` / `optim.frozen` say)
            alpha=16.0,  # the update is scaled by alpha / rank
            dropout=0.0,  # on the adapters' inputs (PEFT's lora_dropout)
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            base_dtype="auto",  # the frozen base's storage dtype; auto: what model.init_from stored (fp32 if none)
        )
    )
    c.train = ConfigDict(
        dict(
            steps=100,
            seed=0,
            grad_accum_steps=1,
            max_rows_per_device=0,  # > 0: raise grad_accum_steps until each device's micro-batch has at most this
            log_every=1,
            checkpoint_every=50,
            keep_checkpoints=3,
            nonfinite="stop",  # stop | skip
            max_consecutive_skips=10,  # with nonfinite=skip: give up after this many non-finite steps in a row
            allow_data_change=False,  # resume even though the data stream's definition changed
        )
    )
    # rules: logical axis -> mesh axes (sharding.LOGICAL_RULES); e.g. --config.mesh.rules.seq="('tensor',)"
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=ConfigDict(dict(LOGICAL_RULES))))
    # Evaluations during the run: NAME -> {kind, data, every, ...}; an entry with empty `data` is off
    # (`train.evaluation`; the kinds: `evals.registry`).
    c.evals = ConfigDict()
    c.metrics = ConfigDict(
        dict(peak_flops_per_device=0.0, tensorboard=True, progress_bar=True, log_all_processes=False)
    )  # log_all_processes: every process prints the run's log lines (default: process 0 only)
    c.distributed = ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1))
    return c


# `data` keys that only tune reading speed; every other one defines the stream a resumed run continues.
_DATA_SPEED_KEYS = ("read_threads", "prefetch")


def data_stream(data: ConfigDict) -> dict[str, Any]:
    """What defines the sequence of batches, as JSON values (`path` resolved), for checkpoints to record."""
    stream = {k: v for k, v in json.loads(data.to_json_best_effort()).items() if k not in _DATA_SPEED_KEYS}
    if stream.get("path"):
        stream["path"] = str(Path(stream["path"]).expanduser().resolve())
    return stream


def model_overrides(model: ConfigDict) -> dict[str, int]:
    """The architecture fields the config sets explicitly (placeholders left at None are skipped)."""
    return {k: model[k] for k in _MODEL_OVERRIDES if model[k] is not None}


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {allowed}; fix --config.{key}")


def run_settings(model: ConfigDict) -> Runtime:
    """The `Runtime` a config's `model` section declares: fp32 master weights, its run keys for the rest."""
    return Runtime.from_settings(model, prefix="model.", param_dtype="float32")


def validate(config: ConfigDict) -> None:
    """Refuse values the engine cannot run before anything is built or written."""
    run_settings(config.model)
    LoRAConfig.from_config(config.get("lora"))
    if config.train.max_rows_per_device < 0:
        raise ConfigError("train.max_rows_per_device must be 0 (no limit) or positive")
    _one_of(config.model.dtype, ("float32", "bfloat16"), "model.dtype")  # master weights stay fp32 either way
    _one_of(config.train.nonfinite, ("stop", "skip"), "train.nonfinite")
    make_rules(config.mesh.rules)
    for key in (
        "train.steps",
        "train.grad_accum_steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.max_consecutive_skips",
        "data.seq_len",
        "data.global_batch_size",
    ):
        section, name = key.split(".")
        if config[section][name] <= 0:
            raise ConfigError(f"{key}={config[section][name]} must be positive; fix --config.{key}")
    _check_data_path(config)


# Sources with built-in data, and per objective the source that reads `data.path` instead.
_BUILT_IN_SOURCES = ("synthetic", "stdlib", "sample_images", "spoken", "omni_mix")
_PATH_SOURCES = {"causal_lm": "text (documents) or npy (token ids)", "mntp": "text", "contrastive": "pairs"}


def _check_data_path(config: ConfigDict) -> None:
    """A `data.path` (or `data.mixture`) the source would never read is a mistake, not something to ignore."""
    data = config.data
    given = [f"data.{k}={data[k]!r}" for k in ("path", "mixture") if k in data and data[k]]
    if data.source in _BUILT_IN_SOURCES and given:
        reader = _PATH_SOURCES.get(config.objective, "the objective's file source")
        raise ConfigError(
            f"{' and '.join(given)} would be ignored: data.source={data.source!r} generates its own data; set "
            f"--config.data.source={reader.split(' ')[0]} to train on it (objective {config.objective}: {reader})"
        )


def warn_if_warmup_exceeds_run(config: ConfigDict) -> None:
    """A run shorter than its warmup never reaches its peak learning rate: say so, naming both keys."""
    warmup, steps = config.optim.warmup_steps, config.train.steps
    if warmup >= steps:
        logging.getLogger(__name__).warning(
            "optim.warmup_steps=%d is not shorter than train.steps=%d: the learning rate never reaches "
            "optim.learning_rate; lower --config.optim.warmup_steps for a short run",
            warmup,
            steps,
        )


_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def _flag_values(argv: list[str]) -> flags.FlagValues:
    """A private absl flag registry (no global FLAGS), parsed like big_vision's `--config` flag."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "ml_collections config FILE.py[:PRESET]", flag_values=fv, lock_config=True, sys_argv=argv
    )
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, tensorboard, metrics.jsonl)", flag_values=fv)
    try:
        rest = fv(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"bad train arguments: {e}") from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments {rest[1:]}; train takes --config, --workdir and --config.key=value")
    return fv


def _loaded(fv: flags.FlagValues) -> ConfigDict:
    if fv["config"].value is None:
        raise ConfigError("missing --config configs/FILE.py[:PRESET]")
    config = fv.config
    if not isinstance(config, ConfigDict):  # config_flags defers a load failure to the first access
        try:
            config.objective  # noqa: B018 - raises the deferred load error
        except Exception as e:
            raise ConfigError(f"cannot load --config {fv['config'].config_filename}: {e}") from None
    return config


def parse_config_args(argv: list[str], *, command: str = "train", workdir: str = "") -> tuple[ConfigDict, str]:
    """`--config FILE.py[:PRESET] --workdir DIR [--config.key=value ...]` → (config, workdir), for any
    command with an ml_collections config (`bidirlm COMMAND`); `workdir` says what goes there.

    Overrides are checked against the loaded config first, so a typo is reported by name.
    """
    argv = [f"bidirlm {command}", *argv]
    base = _loaded(_flag_values([a for a in argv if not _OVERRIDE.match(a)]))
    for arg in argv:
        if match := _OVERRIDE.match(arg):
            _check_key(base, match.group(1), arg)
    fv = _flag_values(argv)
    config = _loaded(fv)
    if not fv.workdir:
        raise ConfigError(f"missing --workdir DIR ({workdir or 'where the outputs go'})")
    return config, expand_user(fv.workdir)


def _check_key(config: ConfigDict, key: str, arg: str) -> None:
    """Refuse an override of a key the config does not have, naming the closest one it has."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            close = difflib.get_close_matches(part, list(node) if isinstance(node, ConfigDict) else [], n=1)
            hint = f"; did you mean {'.'.join([*parts[:i], close[0], *parts[i + 1 :]])!r}?" if close else "."
            raise ConfigError(
                f"unknown config key {key!r} (from {arg!r}){hint} See the config file (and "
                "bidirlm_jax/train/config.py for the engine's keys) for the valid ones"
            )
        node = node[part]


def parse_train_args(argv: list[str]) -> tuple[ConfigDict, str]:
    """`bidirlm train`'s arguments → (validated config, workdir)."""
    config, workdir = parse_config_args(argv, workdir="where checkpoints, tensorboard logs and metrics.jsonl go")
    validate(config)
    warn_if_warmup_exceeds_run(config)
    return config, workdir
