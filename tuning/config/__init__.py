"""Config stage: command line / YAML / JSON → one validated :class:`SFTConfig`."""

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
    unescape,
)
from tuning.config.parser import (
    build_parser,
    command_options,
    file_values,
    output_dir_hint,
    parse_command_line,
    parse_config,
    peek_flag,
    resolved_config_dict,
    save_resolved_config,
)
from tuning.config.rules import SEED_MAX

__all__ = [
    "BNB_METHODS",
    "KAHAN_OPTIMIZERS",
    "SEED_MAX",
    "DataArgs",
    "ModelArgs",
    "PeftArgs",
    "QuantArgs",
    "SFTConfig",
    "TrackerArgs",
    "TrainArgs",
    "build_parser",
    "command_options",
    "file_values",
    "output_dir_hint",
    "parse_command_line",
    "parse_config",
    "peek_flag",
    "resolved_config_dict",
    "save_resolved_config",
    "unescape",
]
