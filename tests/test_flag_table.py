"""``--help`` and a mistyped flag answered before transformers, peft and torch import (tuning/flag_table.py):
the rebuilt parser prints the real parser's help to the character, a typo gets the full path's error
line, and whatever the table cannot judge goes the full way."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, io_rows, write_json
from tuning import flag_table
from tuning.config import build_parser, parse_config
from tuning.config.fms import LEGACY, LORA_PASSTHROUGH
from tuning.errors import UserError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNING_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("columns", ["80", "200"])
def test_the_rebuilt_parser_prints_the_real_help_to_the_character(columns, monkeypatch):
    monkeypatch.setenv("COLUMNS", columns)  # argparse wraps to the terminal's width
    real = build_parser()
    rebuilt = flag_table.rebuild(flag_table.describe(real, [*LEGACY, *LORA_PASSTHROUGH]), prog=real.prog)
    assert rebuilt.format_help() == real.format_help()
    assert len(real.format_help().splitlines()) > 400  # every TrainingArguments flag is in it


def test_building_the_parser_stores_the_table_once_keyed_by_what_it_depends_on(cache, tmp_path, monkeypatch):
    assert flag_table.load() is None
    build_parser()
    (stored,) = cache.glob("flags-*.json")
    assert stored == flag_table.table_path()
    table = json.loads(stored.read_text())
    assert "evaluation_strategy" in table["translated"]  # transformers 4's name, rewritten before parsing
    # a change to the config code is another key: that table is never read for it
    code = tmp_path / "config"
    code.mkdir()
    for path in flag_table._CONFIG_CODE.glob("*.py"):
        (code / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(flag_table, "_CONFIG_CODE", code)
    assert flag_table.table_path() == stored
    (code / "args.py").write_text((code / "args.py").read_text() + "\n# a new flag\n")
    assert flag_table.table_path() != stored and flag_table.load() is None


def _full_path_error(argv: list[str]) -> str:
    with pytest.raises(UserError) as raised:
        parse_config(argv)
    return str(raised.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["--lerning_rate", "1e-5"],
        ["--model_name_or_path", "m", "--num_train_epoches=2", "--output_dir", "o"],
        ["--per_device_batch_size", "4"],  # no unique prefix of anything
        ["--evaluation_strategy", "no", "--tokenizer_name_or_path", "t", "--gradient_acumulation_steps", "2"],
        ["--learning_rate", "-1", "--r", "8", "--lora_alpah", "16"],
    ],
)
def test_a_mistyped_flag_gets_the_full_paths_line_from_the_table(argv, cache, capsys):
    build_parser()
    assert flag_table.answer_early(argv) == 1
    assert capsys.readouterr().err.strip() == f"error: {_full_path_error(argv)}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--model_name_or_path", "m", "--learning_rate", "1e-5"],  # nothing wrong: the run goes on
        ["--learn", "1e-5"],  # an abbreviation argparse accepts
        ["--save_strategy", "always", "--lerning_rate", "1"],  # a bad value: the full parser says which
        ["--learning_rate"],  # a flag without its value
        ["--config", "job.yaml", "--lerning_rate", "1"],  # a file's keys are checked the full way
    ],
)
def test_what_the_table_cannot_judge_goes_the_full_way(argv, cache, capsys):
    build_parser()
    assert flag_table.answer_early(argv) is None
    assert capsys.readouterr().err == ""


def test_without_a_usable_table_everything_goes_the_full_way(cache):
    assert flag_table.answer_early(["--help"]) is None
    assert flag_table.answer_early(["--lerning_rate", "1"]) is None
    cache.mkdir(parents=True)
    for damaged in ('{"groups": [{"title": "options"}]}', "[1, 2]", '{"usage": null'):
        flag_table.table_path().write_text(damaged)
        assert flag_table.answer_early(["--help"]) is None


def test_an_unwritable_cache_only_costs_speed(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TUNING_CACHE_DIR", str(blocker / "cache"))  # under a file: mkdir fails
    assert isinstance(build_parser(), argparse.ArgumentParser)
    assert flag_table.load() is None


def test_the_typo_error_goes_where_the_full_path_writes_it(cache, tmp_path):
    build_parser()
    out = tmp_path / "existing-run"
    out.mkdir()
    assert flag_table.answer_early(["--output_dir", str(out), "--lerning_rate", "1"]) == 1
    assert (out / "error.log").read_text().startswith("error: unknown flag --lerning_rate")
    assert flag_table.answer_early(["--output_dir", str(tmp_path / "new"), "--foo"]) == 1
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.parametrize("entry", [["-m", "tuning.sft_trainer"], ["-m", "tuning.cli", "train"]])
def test_the_second_help_and_typo_import_no_training_stack(entry, cache, tmp_path):
    """The real entry points: the first ``--help`` builds the parser (and the table), the next ones
    print the same text without importing transformers, peft or torch."""
    env = {**os.environ, "TUNING_CACHE_DIR": str(cache), "COLUMNS": "100"}

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-X", "importtime", *entry, *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)

    def imported(done: subprocess.CompletedProcess) -> set[str]:
        lines = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if "import time:" in line]
        return {name.split(".")[0] for name in lines}

    first, second = run("--help"), run("--help")
    assert first.returncode == second.returncode == 0
    assert second.stdout == first.stdout and "--learning_rate" in first.stdout
    assert "transformers" in imported(first)
    assert not {"transformers", "peft", "torch"} & imported(second)
    data = write_json(tmp_path / "d.json", io_rows(1))
    typo = run("--training_data_path", str(data), "--num_train_epoch", "1", "--lerning_rate", "1e-5")
    assert typo.returncode == 1
    assert typo.stderr.strip().splitlines()[-1] == (
        "error: unknown flag --lerning_rate (did you mean --learning_rate?); see --help"
    )
    assert not {"transformers", "peft", "torch"} & imported(typo)
