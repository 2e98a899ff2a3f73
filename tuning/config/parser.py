"""One parser for the command line and config files, with one precedence rule: the file (``--config``, or
the job fms-hf-tuning's ``$SFT_TRAINER_CONFIG_JSON_PATH`` / ``$SFT_TRAINER_CONFIG_JSON_ENV_VAR`` hand over)
sets values, command-line flags override them. Unknown keys fail with the closest valid name.

A file value goes through exactly what the same flag goes through: the text is converted by that flag's
own argparse action (its type, its choices), then every value, wherever it came from, is checked
against the rules in :mod:`tuning.config.rules`, and the dataclasses check themselves once more. So a
file can never set what the flag would refuse. A file only adds what no command line can spell:
``null`` for a field that may be unset, a list for a flag that takes one, and a mapping (the JSON object
the flag takes as text)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from tuning import flag_table
from tuning.compat import argparse as argparse_private
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
    float_fields,
    text_fields,
)
from tuning.config.fms import LEGACY, LORA_PASSTHROUGH, FmsArgs, resolve_fms, translate_argv, translate_file
from tuning.config.rules import check_values
from tuning.errors import ArgumentParser, UserError, did_you_mean
from tuning.files import LAUNCH_ARGS_KEY, check_writable_folder, job_from_environment, read_mapping_file

# SFTConfig field → dataclass; a new stage's arguments are one more entry here.
ARG_GROUPS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "train": TrainArgs,
    "peft": PeftArgs,
    "trackers": TrackerArgs,
    "quant": QuantArgs,
    "fms": FmsArgs,
}
RESOLVED_CONFIG_NAME = "resolved_config.yaml"
# A step count given without its strategy means "every N steps": the fms-hf-tuning commands rely on it.
STEP_FLAGS = {
    "logging_steps": "logging_strategy",
    "save_steps": "save_strategy",
    "eval_steps": "eval_strategy",
}
# argparse reads "-1e-4" and "-inf" as unknown flags ("expected one argument"); only "-1" and "-.5" count
# as numbers. Negative values must reach the range check, which can say what is wrong with them.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)
_UNSET = object()

logger = logging.getLogger(__name__)


class _ParseError(Exception):
    """argparse's complaint, tidied; the caller says whether it was the command line or the file."""


class _Parser(ArgumentParser, HfArgumentParser):
    """The dataclasses' flags. On a bad flag argparse exits 2 with usage text; we raise instead (the
    caller makes it a UserError naming the command line or the config file: exit 1, one line), read
    negative numbers as values, and suggest the closest choice."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _ParseError(_tidy(message))

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            names = [str(c) for c in action.choices]
            hint = did_you_mean(str(value), names)
            raise argparse.ArgumentError(
                action, f"invalid choice: {str(value)!r}{hint}; choose from {', '.join(names)}"
            )


def _tidy(message: str) -> str:
    """``argument --learning_rate/--learning-rate: ...`` → ``--learning_rate: ...``."""
    return re.sub(r"argument (-[-\w]+)(/-[-\w]+)*:", r"\1:", message)


def build_parser() -> HfArgumentParser:
    """The parser of every flag (a command may add flags of its own to it: :func:`command_options`)."""
    parser = _Parser(
        tuple(ARG_GROUPS.values()),
        allow_abbrev=True,
        usage="%(prog)s [--config FILE] [--FLAG VALUE ...]  (every flag below; a file's keys are the same)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML or JSON file with the same keys as the flags; command-line flags override it.",
    )
    for action in argparse_private.actions(parser):
        hint = field_hints().get(action.dest)
        if hint is not None and _admits(hint, dict) and action.nargs is None:
            action.type = _json_object_type(action.type, text_too=_admits(hint, str))
    flag_table.store(parser, [*LEGACY, *LORA_PASSTHROUGH])  # --help and typos, next time, in a blink
    return parser


def command_options(parser: HfArgumentParser, command: str, usage: str) -> Any:
    """The group for the flags of ``tuning COMMAND`` itself: ``--help`` lists it first, with a short usage
    line, above the hundreds of training flags the command also takes."""
    parser.prog = f"tuning {command}"
    parser.usage = f"%(prog)s {usage} [TRAINING FLAGS ...]"
    group = parser.add_argument_group(f"tuning {command} options")
    argparse_private.put_group_first(parser, group, "training flags (those of tuning train)")
    return group


@cache
def field_hints() -> dict[str, Any]:
    """Flag name → the type hint of its dataclass field, across every argument group."""
    return {name: hint for cls in ARG_GROUPS.values() for name, hint in typing.get_type_hints(cls).items()}


def _members(hint: Any) -> tuple:
    is_union = typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType)
    return typing.get_args(hint) if is_union else (hint,)


def _admits(hint: Any, kind: type) -> bool:
    """Whether a field typed ``hint`` may hold a ``kind`` (None, dict, list, str)."""
    return any(m is kind or typing.get_origin(m) is kind for m in _members(hint))


def _json_object_type(fallback: Callable[[str], Any] | None, text_too: bool) -> Callable[[str], Any]:
    """Text starting with ``{`` is a JSON object (Hugging Face's rule for its dict flags), parsed here so
    a bad one is refused by the parser; other text stays a path or name where the field takes one."""

    def convert(text: str) -> Any:
        if text.lstrip().startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"not valid JSON: {e.msg} at column {e.colno}") from None
            if isinstance(value, dict):
                return value
        if not text_too:
            raise argparse.ArgumentTypeError(f'expected a JSON object such as {{"key": 1}}, got {text!r:.40}')
        return fallback(text) if fallback else text

    return convert


def peek_flag(argv: list[str], dest: str, parser: argparse.ArgumentParser | None = None) -> str | None:
    """The value given for ``--dest`` on a command line that may not parse (:func:`tuning.flag_table.peek`)."""
    return flag_table.peek(argv, dest, parser or build_parser())


def output_dir_hint(argv: list[str]) -> str | None:
    """``--output_dir`` of a command line, or of its ``--config`` file (or the job in the environment),
    for the termination log of a command that failed before (or while) parsing."""
    return flag_table.output_dir_of(argv, build_parser())


def parse_config(argv: list[str], defaults: dict[str, Any] | None = None) -> SFTConfig:
    """Parse flags (and ``--config FILE``, or a job in the environment) into a validated :class:`SFTConfig`.
    ``defaults``: what the launch environment needs (e.g. the CPU backend for DeepSpeed); the file and the
    flags override it."""
    return parse_command_line(argv, defaults=defaults)[0]


def parse_command_line(
    argv: list[str],
    parser: HfArgumentParser | None = None,
    defaults: dict[str, Any] | None = None,
    needs_data: bool = True,
) -> tuple[SFTConfig, argparse.Namespace]:
    """:func:`parse_config` for a command whose ``parser`` (from :func:`build_parser`) has flags of its
    own: returns them too, as a namespace. ``needs_data=False``: a command that reads no data (``tuning
    plan``) may leave the data flags out."""
    parser = parser or build_parser()
    argv = translate_argv(argv)  # fms-hf-tuning's and transformers 4's names → ours (tuning/config/fms.py)
    on_cli = _command_line_values(parser, argv)
    config_file = on_cli.pop("config", None)
    source, from_file = file_values(config_file, parser)
    preset = {**(defaults or {}), **from_file, **implied_step_strategies(on_cli, from_file)}
    try:
        namespace, _ = parser.parse_known_args(argv, namespace=argparse.Namespace(**preset))
    except _ParseError as e:  # checked by _command_line_values already; kept for safety
        raise UserError(f"invalid command line: {e}; run with --help for the list of flags") from None
    values = vars(namespace)

    def where(name: str) -> str:
        if name in on_cli:
            return " (command line)"
        return f" ({source})" if name in from_file else ""

    text = [name for cls in ARG_GROUPS.values() for name in text_fields(cls)]
    floats = set().union(*(float_fields(cls) for cls in ARG_GROUPS.values()))
    check_values(values, text, where, floats)
    check_combinations(values, where)
    config = SFTConfig(**{name: _build_group(cls, values) for name, cls in ARG_GROUPS.items()})
    resolve_fms(config)
    grouped = {f.name for cls in ARG_GROUPS.values() for f in dataclasses.fields(cls)} | {"config"}
    extras = argparse.Namespace(**{k: v for k, v in values.items() if k not in grouped})
    validate(config, needs_data)
    return config, extras


def _command_line_values(parser: HfArgumentParser, argv: list[str]) -> dict[str, Any]:
    """The flags the command line itself sets (by destination, abbreviations and ``--flag=value`` too),
    asked of argparse: a sentinel namespace keeps every flag not given at the sentinel."""
    probe = argparse.Namespace(**{a.dest: _UNSET for a in argparse_private.actions(parser)})
    try:
        given, remaining = parser.parse_known_args(argv, namespace=probe)
    except _ParseError as e:
        raise UserError(f"invalid command line: {e}; run with --help for the list of flags") from None
    if remaining:
        dests = [a.dest for a in argparse_private.actions(parser) if a.dest not in ("help", "config")]
        flag = next((r for r in remaining if r.startswith("-")), remaining[0])
        raise flag_table.unknown_flag(flag, dests)
    return {k: v for k, v in vars(given).items() if v is not _UNSET and k != "help"}


def file_values(config_file: str | None, parser: HfArgumentParser) -> tuple[str, dict[str, Any]]:
    """(where, values) a file sets: ``--config FILE``, else the job fms-hf-tuning's environment variables
    hand over (``$SFT_TRAINER_CONFIG_JSON_ENV_VAR`` / ``$SFT_TRAINER_CONFIG_JSON_PATH``); flags override
    both. Each value is converted by its flag's argparse action."""
    if config_file:
        return f"config file {config_file}", load_config_file(config_file, parser)
    job = job_from_environment(scalars_as_text=True)
    if job is None:
        return "", {}
    where, values = job
    logger.info("reading the %s; command-line flags override it", where)
    return where, convert_config_values(values, where, parser)


def load_config_file(path: str, parser: HfArgumentParser | None = None) -> dict[str, Any]:
    """A ``--config`` file's values, each converted by its flag's argparse action (type, choices)."""
    values = read_mapping_file(path, "config file", scalars_as_text=True)
    return convert_config_values(values, f"config file {path}", parser or build_parser())


def convert_config_values(values: dict[str, Any], where: str, parser: HfArgumentParser) -> dict[str, Any]:
    """The flag values of a config or job mapping (values as text, see ``read_mapping_file``), converted
    like the flags: unknown keys rejected, the launcher's own key set aside (a ``tuning launch`` job file
    is also a ``--config`` file)."""
    actions: dict[str, argparse.Action] = {}
    # the first action of a dest is the flag's; --no_X shares the dest
    for action in argparse_private.actions(parser):
        actions.setdefault(action.dest, action)
    valid = [d for d in actions if d not in ("help", "config")]
    # a flag's other spellings (--r for lora_r, --max_length) are keys too
    spelled = {
        o[2:]: a.dest
        for a in actions.values()
        for o in a.option_strings
        if o.startswith("--") and not argparse_private.is_store_false(a)  # not --no_X: inverted
    }
    values = {spelled.get(k, k) if k not in valid else k: v for k, v in translate_file(values).items()}
    if values.pop(LAUNCH_ARGS_KEY, None) is not None:
        logger.info("%s: %s is read by tuning launch only; ignored here", where, LAUNCH_ARGS_KEY)
    out = {}
    for key, value in values.items():
        if key not in valid:
            raise UserError(f"unknown key '{key}' in {where}{did_you_mean(key, valid, flag=True)}")
        try:
            out[key] = _file_value(parser, actions[key], field_hints().get(key, str), value)
        except _FileValueError as e:
            raise UserError(f"{where}: {key}: {e}") from None
        except argparse.ArgumentError as e:
            raise UserError(f"{where}: {key}: {e.message.rstrip('.')}; fix it there") from None
    return out


class _FileValueError(Exception):
    """A file value of a shape its flag can't take (the message says what it takes)."""


def _file_value(parser: HfArgumentParser, action: argparse.Action, hint: Any, value: Any) -> Any:
    """One file value → what the flag's action makes of the same text. Text is converted by the
    action's type and checked against its choices (argparse's own two steps, called directly)."""

    def convert(text: str) -> Any:
        return argparse_private.convert(parser, action, text)

    takes = f"it takes {_describe(hint)}"
    if value is None:
        if not _admits(hint, type(None)):
            raise _FileValueError(f"null is not allowed, {takes}; give one or remove the key for the default")
        return None
    if isinstance(value, dict):
        if action.nargs is not None or not _admits(hint, dict):
            raise _FileValueError(f"a mapping is not allowed, {takes}")
        return convert(json.dumps(value))
    if isinstance(value, list):
        if action.nargs != "+" and not _admits(hint, list):
            raise _FileValueError(f"a list is not allowed, {takes}")
        bad = next((item for item in value if not isinstance(item, str)), _UNSET)
        if bad is not _UNSET:
            raise _FileValueError(f"list items must be single values, got {bad!r:.40}")
        return [convert(item) for item in value]
    return [convert(value)] if action.nargs == "+" else convert(value)  # one item, as on the command line


_KINDS = {float: "a number", int: "a whole number", str: "text", bool: "true or false", dict: "a mapping"}


def _describe(hint: Any) -> str:
    """``float | None`` → "a number or null"; ``list[str]`` → "a list of text"."""
    out = []
    for member in _members(hint):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if member is type(None):
            out.append("null")
        elif origin is list:
            out.append(f"a list of {_describe(args[0]).removeprefix('a ')}" if args else "a list")
        elif origin is typing.Literal:
            out.append("one of " + ", ".join(map(str, args)))
        else:
            out.append(_KINDS.get(origin or member, getattr(member, "__name__", str(member))))
    return " or ".join(dict.fromkeys(out))


def _build_group(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    try:
        return cls(**{k: v for k, v in values.items() if k in names})
    except ValueError as e:  # raised by the dataclasses' own validation (e.g. TrainingArguments)
        raise UserError(f"invalid arguments: {e}") from None
    except OSError as e:  # a file a flag names (--accelerator_config PATH) that can't be read
        raise UserError(f"invalid arguments: cannot read {e.filename}: {e.strerror}") from None
    except TypeError as e:  # every keyword is a field: this is a value's contents (a JSON object's keys)
        raise UserError(f"invalid arguments: {e}") from None
    except ImportError as e:  # TrainingArguments imports what a flag needs: --deepspeed needs deepspeed
        if "deepspeed" in str(e).lower():
            raise UserError(
                "--deepspeed needs DeepSpeed, which is not installed; pip install 'tuning[deepspeed]' "
                "(or pip install deepspeed)"
            ) from None
        raise UserError(f"a training flag needs a package that is not installed: {e}") from None


def implied_step_strategies(on_cli: dict[str, Any], from_file: dict[str, Any]) -> dict[str, str]:
    """``--logging_steps N`` without ``--logging_strategy`` switches that strategy to steps (same for
    save and eval), whether the count came from the command line or the file."""
    implied = {}
    given = {**from_file, **on_cli}
    for steps, strategy in STEP_FLAGS.items():
        if steps in given and strategy not in given:
            implied[strategy] = "steps"
            value = given[steps]
            shown = f"{value:g}" if isinstance(value, (int, float)) else value
            logger.info("--%s %s without --%s: %s is steps", steps, shown, strategy, strategy)
    return implied


def validate(config: SFTConfig, needs_data: bool = True) -> None:
    """Cross-field checks that no single dataclass can do."""
    if not config.model.model_name_or_path:
        raise UserError("--model_name_or_path is required: a local model folder or a hub id")
    if needs_data and not config.data.training_data_path and not config.data.data_config_path:
        raise UserError(
            "--training_data_path is required: a data file, folder, glob or hub id (or pass --data_config_path)"
        )
    train = config.train
    if config.data.data_config_path:
        _validate_data_config(config)
    if not train.output_dir:
        raise UserError("--output_dir is required: the folder for checkpoints and logs")
    check_writable_folder(train.output_dir, "--output_dir")
    if train.save_model_dir:
        check_writable_folder(train.save_model_dir, "--save_model_dir")
    if train.max_steps <= 0 and not (train.num_train_epochs > 0 and math.isfinite(train.num_train_epochs)):
        raise UserError(
            f"--num_train_epochs is {train.num_train_epochs}: nothing would be trained; "
            "pass a positive --num_train_epochs or --max_steps"
        )
    if config.data.packing and config.data.packing_strategy == "bfd" and not train.padding_free:
        raise UserError(
            "--packing_strategy bfd keeps packed samples apart only in padding-free batches, and "
            "--padding_free is false; drop --padding_free false, or pass --packing_strategy wrapped "
            "(samples in a row then attend to each other)"
        )
    if config.data.instruction_template and not config.data.response_template:
        raise UserError("--instruction_template needs --response_template (loss starts after it)")
    _validate_memory_modes(config)
    _validate_evaluation_extras(config.train)


def _validate_evaluation_extras(train: TrainArgs) -> None:
    """Early stopping and sample generations happen at evaluations: there must be some."""
    wanted = [
        flag
        for flag, value in (
            ("--early_stopping_patience", train.early_stopping_patience),
            ("--eval_generations", train.eval_generations),
        )
        if value
    ]
    if wanted and str(getattr(train.eval_strategy, "value", train.eval_strategy)) == "no":
        raise UserError(
            f"{wanted[0]} acts at each evaluation and --eval_strategy is no; pass --eval_strategy steps "
            "(with --eval_steps) or epoch, and --validation_data_path"
        )


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
    optim = config.train.optim_name
    if config.model.master_weights == "kahan" and optim not in KAHAN_OPTIMIZERS:
        raise UserError(
            f"--master_weights kahan brings its own Kahan-compensated AdamW, but --optim is {optim}; use "
            f"--optim {KAHAN_OPTIMIZERS[0]}, or --master_weights float32 or half to keep {optim}"
        )


def check_combinations(values: dict[str, Any], where: Callable[[str], str]) -> None:
    """Values each in range but wrong together; checked on the parsed values, before the dataclasses
    (whose own checks would word it less clearly, or not check it at all)."""
    for steps, strategy in STEP_FLAGS.items():
        value = values.get(steps)
        if values.get(strategy) == "steps" and value is not None and value <= 0:
            raise UserError(
                f"--{steps} is {value:g}{where(steps)} with --{strategy} steps: it must be positive (a number "
                f"of steps, or a fraction of the run below 1); pass e.g. --{steps} 100, or another --{strategy}"
            )
    budget, longest = values.get("max_tokens_per_batch"), values.get("max_seq_length") or 0
    if budget is not None and budget < longest:
        raise UserError(
            f"--max_tokens_per_batch {budget} is smaller than --max_seq_length {longest}: a sample that long "
            f"would not fit in any batch; pass --max_tokens_per_batch >= {longest} or a smaller --max_seq_length"
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
