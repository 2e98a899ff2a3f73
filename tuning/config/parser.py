"""One parser for the command line and config files, with one precedence rule: the file (``--config``, or
the job fms-hf-tuning's ``$SFT_TRAINER_CONFIG_JSON_PATH`` / ``$SFT_TRAINER_CONFIG_JSON_ENV_VAR`` hand over)
sets values, command-line flags override them. Unknown keys fail with the closest valid name."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from tuning.config.args import DataArgs, ModelArgs, PeftArgs, QuantArgs, SFTConfig, TrackerArgs, TrainArgs
from tuning.errors import ArgumentParser, UserError, did_you_mean
from tuning.files import LAUNCH_ARGS_KEY, job_from_environment, read_mapping_file

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


class _Parser(ArgumentParser, HfArgumentParser):
    """The dataclasses' flags, with our error handling (a UserError, not argparse's exit 2)."""


def build_parser() -> HfArgumentParser:
    parser = _Parser(tuple(ARG_GROUPS.values()), allow_abbrev=True)
    parser.add_argument(
        "--config",
        default=None,
        help="YAML or JSON file with the same keys as the flags; command-line flags override it.",
    )
    return parser


def peek_flag(argv: list[str], dest: str, parser: argparse.ArgumentParser | None = None) -> str | None:
    """The value given for ``--dest`` on a command line that may not parse: the exact flag, ``--dest=V``
    or a unique prefix of it (argparse's abbreviation rule over ``parser``'s flags). The last one wins."""
    options = [o for a in (parser or build_parser())._actions for o in a.option_strings if o.startswith("--")]
    target, found = f"--{dest}", None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if not name.startswith("--"):
            continue
        matches = [o for o in options if o.startswith(name)]
        if name == target or matches == [target]:
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def output_dir_hint(argv: list[str]) -> str | None:
    """``--output_dir`` of a command line, or of its ``--config`` file (or the job in the environment),
    for the termination log of a command that failed before (or while) parsing."""
    parser = build_parser()
    given = peek_flag(argv, "output_dir", parser)
    if given:
        return given
    config_file = peek_flag(argv, "config", parser)
    try:
        if config_file:
            values = read_mapping_file(config_file, "config file")
        else:
            values = (job_from_environment() or ("", {}))[1]
    except UserError:
        return None
    value = values.get("output_dir")
    return value if isinstance(value, str) else None


def load_config_file(path: str, valid_keys: list[str]) -> dict[str, Any]:
    """Read a flat YAML/JSON mapping of flag names to values; reject unknown keys."""
    return check_config_keys(read_mapping_file(path, "config file"), f"config file {path}", valid_keys)


def check_config_keys(values: dict[str, Any], where: str, valid_keys: list[str]) -> dict[str, Any]:
    """The flag values of a config or job mapping: unknown keys rejected, the launcher's own key set aside
    (a ``tuning launch`` job file is also a ``--config`` file)."""
    values = dict(values)
    if values.pop(LAUNCH_ARGS_KEY, None) is not None:
        logger.info("%s: %s is read by tuning launch only; ignored here", where, LAUNCH_ARGS_KEY)
    for key in values:
        if key not in valid_keys:
            raise UserError(f"unknown key '{key}' in {where}{did_you_mean(key, valid_keys, flag=True)}")
    return values


def config_file_values(
    argv: list[str], valid_keys: list[str], parser: argparse.ArgumentParser | None = None
) -> dict[str, Any]:
    """The values a file sets: ``--config FILE``, else the job fms-hf-tuning's environment variables hand
    over (``$SFT_TRAINER_CONFIG_JSON_ENV_VAR`` / ``$SFT_TRAINER_CONFIG_JSON_PATH``); flags override both."""
    config_file = peek_flag(argv, "config", parser)
    if config_file:
        return load_config_file(config_file, valid_keys)
    job = job_from_environment()
    if job is None:
        return {}
    where, values = job
    logger.info("reading the %s; command-line flags override it", where)
    return check_config_keys(values, where, valid_keys)


def parse_config(argv: list[str]) -> SFTConfig:
    """Parse flags (and ``--config FILE``, or a job in the environment) into a validated :class:`SFTConfig`."""
    return parse_command_line(argv)[0]


def parse_command_line(
    argv: list[str], parser: HfArgumentParser | None = None
) -> tuple[SFTConfig, argparse.Namespace]:
    """:func:`parse_config` for a command whose ``parser`` (from :func:`build_parser`) has flags of its
    own: returns them too, as a namespace."""
    parser = parser or build_parser()
    dests = [a.dest for a in parser._actions if a.dest not in ("help", "config")]
    file_values = config_file_values(argv, dests, parser)
    parser.set_defaults(**file_values)
    imply_step_strategies(parser, argv, file_values)
    try:
        *groups, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:  # raised by the dataclasses' own validation (e.g. TrainingArguments)
        raise UserError(f"invalid arguments: {e}") from None
    if remaining:
        flag = next((r for r in remaining if r.startswith("-")), remaining[0])
        raise UserError(
            f"unknown flag {flag}{did_you_mean(flag.split('=')[0], dests, flag=True)}; see --help"
        )
    extras = argparse.Namespace()
    for namespace in [g for g in groups if isinstance(g, argparse.Namespace)]:
        vars(extras).update(vars(namespace))
    groups = [g for g in groups if not isinstance(g, argparse.Namespace)]
    config = SFTConfig(**dict(zip(ARG_GROUPS, groups, strict=True)))
    validate(config)
    return config, extras


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
    if config.data.packing and config.data.packing_strategy == "bfd" and not train.padding_free:
        raise UserError(
            "--packing_strategy bfd keeps packed samples apart only in padding-free batches, and "
            "--padding_free is false; drop --padding_free false, or pass --packing_strategy wrapped "
            "(samples in a row then attend to each other)"
        )
    if config.data.instruction_template and not config.data.response_template:
        raise UserError("--instruction_template needs --response_template (loss starts after it)")


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
