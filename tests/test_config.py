"""Config stage: flags, defaults, the config file, precedence and helpful errors."""

from __future__ import annotations

import json

import pytest

from tuning.config import parse_config
from tuning.config.parser import resolved_config_dict, save_resolved_config
from tuning.errors import UserError

BASE = ["--model_name_or_path", "m", "--training_data_path", "d.json", "--output_dir"]


@pytest.fixture
def base(tmp_path) -> list[str]:
    return [*BASE, str(tmp_path / "out")]


def test_defaults_of_the_tool_family(base):
    cfg = parse_config(base)
    assert cfg.train.save_strategy == "epoch"
    assert cfg.train.logging_strategy == "epoch"
    assert cfg.train.report_to in ([], "none", ["none"])
    assert cfg.train.optim == "adamw_torch"
    assert cfg.model.torch_dtype == "bfloat16" and cfg.model.use_flash_attn
    assert cfg.model.flash_attn_implementation == "flash_attention_2"
    assert cfg.model.trust_remote_code is False
    assert cfg.data.max_seq_length == 4096


def test_seed_flags_parse(base):
    cfg = parse_config(
        [
            *base,
            "--lr_scheduler_type",
            "cosine_with_min_lr",
            "--lr_scheduler_kwargs",
            '{"min_lr_rate": 0.1}',
            "--warmup_ratio",
            "0.03",
            "--gradient_checkpointing",
            "True",
            "--response_template",
            "\\n### Response:",
            "--use_flash_attn",
            "False",
            "--torch_dtype",
            "float32",
            "--save_model_dir",
            "x",
        ]
    )
    assert cfg.train.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert cfg.train.warmup_steps == 0.03
    assert cfg.train.gradient_checkpointing is True
    assert cfg.data.response_template == "\n### Response:"
    assert cfg.model.use_flash_attn is False and cfg.model.torch_dtype == "float32"
    assert cfg.train.save_model_dir == "x"


def test_unknown_flag_names_the_closest(base):
    with pytest.raises(UserError, match=r"unknown flag --lerning_rate \(did you mean --learning_rate\?\)"):
        parse_config([*base, "--lerning_rate", "1e-5"])


def test_unique_prefix_is_accepted(base):
    assert parse_config([*base, "--response_templ", "X:"]).data.response_template == "X:"


def test_bad_choice_is_a_user_error(base):
    with pytest.raises(UserError, match="invalid choice: 'float8'"):
        parse_config([*base, "--torch_dtype", "float8"])


def test_config_file_sets_and_cli_overrides(tmp_path, base):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("learning_rate: 0.5\nnum_train_epochs: 3\nresponse_template: '\\n## A:'\n")
    cfg = parse_config([*base, "--config", str(cfg_file), "--learning_rate", "0.25"])
    assert cfg.train.learning_rate == 0.25  # CLI wins
    assert cfg.train.num_train_epochs == 3  # file sets
    assert cfg.data.response_template == "\n## A:"


def test_json_config_file_can_hold_everything(tmp_path):
    cfg_file = tmp_path / "job.json"
    cfg_file.write_text(
        json.dumps(
            {
                "model_name_or_path": "m",
                "training_data_path": "d.json",
                "output_dir": str(tmp_path / "o"),
                "per_device_train_batch_size": 3,
            }
        )
    )
    assert parse_config(["--config", str(cfg_file)]).train.per_device_train_batch_size == 3


def test_config_file_unknown_key_names_the_closest(tmp_path, base):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("learnig_rate: 0.5\n")
    with pytest.raises(
        UserError, match=r"unknown key 'learnig_rate' in config file .*did you mean --learning_rate"
    ):
        parse_config([*base, "--config", str(cfg_file)])


def test_resolved_config_round_trips(tmp_path, base):
    cfg = parse_config([*base, "--learning_rate", "0.125", "--response_template", "\\n## A:"])
    path = save_resolved_config(cfg, str(tmp_path / "out"))
    again = parse_config(["--config", str(path)])
    assert resolved_config_dict(again) == resolved_config_dict(cfg)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num_train_epochs", "0"], "nothing would be trained"),
        (
            ["--max_seq_length", "0"],
            r"--max_seq_length is 0 \(command line\): it must be a whole number >= 1",
        ),
        (["--instruction_template", "Q:"], "--instruction_template needs --response_template"),
        (
            ["--warmup_ratio", "1.5"],
            r"--warmup_ratio is 1.5 \(command line\): it must be a finite number in \[0, 1\)",
        ),
    ],
)
def test_invalid_values(base, extra, message):
    with pytest.raises(UserError, match=message):
        parse_config([*base, *extra])


def test_required_flags(tmp_path):
    with pytest.raises(UserError, match="--model_name_or_path is required"):
        parse_config(["--training_data_path", "d", "--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match="--training_data_path is required"):
        parse_config(["--model_name_or_path", "m", "--output_dir", str(tmp_path)])


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        parse_config([*BASE, str(f)])
