"""One parser for the command line and config files, with one precedence rule: the file (``--config``)
sets values, command-line flags override them. Unknown keys fail with the closest valid name."""

from __future__ import annotations

import argparse
import difflib
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from tuning.config.args import (
    BNB_METHODS,
    KAHAN_OPTIMIZERS,
    DataArgs,
    ModelArgs,
    PeftArgs,
    QuantArgs,
    SFTConfig,
    TrackerArgs,
    TrainArgs,
)
from tuning.errors import UserError
from tuning.files import read_mapping_file

# SFTConfig field → dataclass; a new stage's arguments are one more entry here.
ARG_GROUPS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "train": TrainArgs,
    "peft": PeftArgs,
    "trackers": TrackerArgs,
    "quant": QuantArgs,
}
RESOLVED_CONFIG_NAME = "resolved_config.yaml"
# A step count given without its strategy means "every N steps": the fms-hf-tuning commands rely on it.
STEP_FLAGS = {
    "logging_steps": "logging_strategy",
    "save_steps": "save_strategy",
    "eval_steps": "eval_strategy",
}

logger = logging.getLogger(__name__)


def closest(name: str, candidates: list[str]) -> str:
    """`` (did you mean --x?)`` for the nearest candidate, or an empty string."""
    match = difflib.get_close_matches(name.lstrip("-"), candidates, n=1, cutoff=0.6)
    return f" (did you mean --{match[0]}?)" if match else ""


class _Parser(HfArgumentParser):
    """argparse exits 2 with usage text on a bad flag; we raise a UserError (exit 1, one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"invalid command line: {message}; run with --help for the list of flags")


def build_parser() -> HfArgumentParser:
    parser = _Parser(tuple(ARG_GROUPS.values()), allow_abbrev=True)
    parser.add_argument(
        "--config",
        default=None,
        help="YAML or JSON file with the same keys as the flags; command-line flags override it.",
    )
    return parser


def _config_file_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def load_config_file(path: str, valid_keys: list[str]) -> dict[str, Any]:
    """Read a flat YAML/JSON mapping of flag names to values; reject unknown keys."""
    values = read_mapping_file(path, "config file")
    for key in values:
        if key not in valid_keys:
            raise UserError(f"unknown key '{key}' in config file {path}{closest(key, valid_keys)}")
    return values


def parse_config(argv: list[str]) -> SFTConfig:
    """Parse flags (and ``--config FILE``) into a validated :class:`SFTConfig`."""
    parser = build_parser()
    dests = [a.dest for a in parser._actions if a.dest not in ("help", "config")]
    config_file = _config_file_arg(argv)
    file_values = load_config_file(config_file, dests) if config_file else {}
    parser.set_defaults(**file_values)
    imply_step_strategies(parser, argv, file_values)
    try:
        *groups, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:  # raised by the dataclasses' own validation (e.g. TrainingArguments)
        raise UserError(f"invalid arguments: {e}") from None
    if remaining:
        flag = next((r for r in remaining if r.startswith("-")), remaining[0])
        raise UserError(f"unknown flag {flag}{closest(flag.split('=')[0], dests)}; see --help")
    groups = [g for g in groups if not isinstance(g, argparse.Namespace)]
    config = SFTConfig(**dict(zip(ARG_GROUPS, groups, strict=True)))
    validate(config)
    return config


def imply_step_strategies(parser: HfArgumentParser, argv: list[str], file_values: dict[str, Any]) -> None:
    """``--logging_steps N`` without ``--logging_strategy`` switches that strategy to steps (same for save
    and eval). Whether a flag was given is asked of argparse itself (a sentinel it never overwrites
    unless the flag is present), so abbreviations and ``--flag=value`` count too."""
    unset = object()
    probe = argparse.Namespace(**{d: unset for pair in STEP_FLAGS.items() for d in pair})
    given, _ = parser.parse_known_args(argv, namespace=probe)
    explicit = {d for d in vars(probe) if getattr(given, d) is not unset} | set(file_values)
    for steps, strategy in STEP_FLAGS.items():
        if steps in explicit and strategy not in explicit:
            parser.set_defaults(**{strategy: "steps"})
            value = file_values[steps] if getattr(given, steps) is unset else getattr(given, steps)
            shown = f"{value:g}" if isinstance(value, (int, float)) else value
            logger.info("--%s %s without --%s: %s is steps", steps, shown, strategy, strategy)


def validate(config: SFTConfig) -> None:
    """Cross-field checks that no single dataclass can do."""
    if not config.model.model_name_or_path:
        raise UserError("--model_name_or_path is required: a local model folder or a hub id")
    if not config.data.training_data_path and not config.data.data_config_path:
        raise UserError(
            "--training_data_path is required: a data file, folder, glob or hub id (or pass --data_config_path)"
        )
    train = config.train
    if config.data.data_config_path:
        _validate_data_config(config)
    if not train.output_dir:
        raise UserError("--output_dir is required: the folder for checkpoints and logs")
    out = Path(train.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder; pass a folder path")
    if train.max_steps <= 0 and not (train.num_train_epochs > 0 and math.isfinite(train.num_train_epochs)):
        raise UserError(
            f"--num_train_epochs is {train.num_train_epochs}: nothing would be trained; "
            "pass a positive --num_train_epochs or --max_steps"
        )
    if config.data.max_seq_length <= 0:
        raise UserError(f"--max_seq_length must be positive, got {config.data.max_seq_length}")
    if config.data.instruction_template and not config.data.response_template:
        raise UserError("--instruction_template needs --response_template (loss starts after it)")
    _validate_memory_modes(config)


def _validate_memory_modes(config: SFTConfig) -> None:
    """QLoRA trains adapters only; Kahan-compensated updates are an AdamW of their own."""
    method, peft_method = config.quant.quantization_method, config.peft.peft_method
    if method in BNB_METHODS and peft_method not in ("lora", "alora"):
        what = "full fine-tuning" if peft_method == "none" else f"--peft_method {peft_method}"
        raise UserError(
            f"--quantization_method {method} (QLoRA) keeps the base weights frozen in {method[4]} bits and trains "
            f"LoRA adapters on them; {what} can't train that way: add --peft_method lora, or drop the "
            "quantization to train without it"
        )
    optim = str(getattr(config.train.optim, "value", config.train.optim))
    if config.model.master_weights == "kahan" and optim not in KAHAN_OPTIMIZERS:
        raise UserError(
            f"--master_weights kahan brings its own Kahan-compensated AdamW, but --optim is {optim}; use "
            f"--optim {KAHAN_OPTIMIZERS[0]}, or --master_weights float32 or half to keep {optim}"
        )


def _validate_data_config(config: SFTConfig) -> None:
    """What the command line alone can tell about ``--data_config_path``; the file's own schema is the
    data stage's (:func:`tuning.data.check_data_config`, run by the entry point right after parsing)."""
    data = config.data
    for flag in ("training_data_path", "validation_data_path"):
        if getattr(data, flag):
            raise UserError(
                f"--{flag} and --data_config_path both name data; put every dataset in the data config "
                "(a validation-only dataset is one with split: {validation: 1.0})"
            )


def resolved_config_dict(config: SFTConfig) -> dict[str, Any]:
    """Flat mapping of every flag to its resolved value: it can be passed back with ``--config``."""
    flat: dict[str, Any] = {}
    for name in ARG_GROUPS:
        group = getattr(config, name)
        flat.update(group.to_dict() if hasattr(group, "to_dict") else asdict(group))
    return flat


def save_resolved_config(config: SFTConfig, output_dir: str) -> Path:
    path = Path(output_dir) / RESOLVED_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved_config_dict(config), sort_keys=True), encoding="utf-8")
    return path
