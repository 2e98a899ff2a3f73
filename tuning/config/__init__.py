"""Config stage: command line / YAML / JSON → one validated :class:`SFTConfig`."""

from tuning.config.args import DataArgs, ModelArgs, SFTConfig, TrainArgs
from tuning.config.parser import parse_config, save_resolved_config

__all__ = ["DataArgs", "ModelArgs", "SFTConfig", "TrainArgs", "parse_config", "save_resolved_config"]
