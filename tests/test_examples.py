"""Every example job file in examples/ parses and validates as the entry point would take it: a YAML or
JSON ``--config`` file, and a JSON job handed over fms-hf-tuning's way (``SFT_TRAINER_CONFIG_JSON_PATH``),
data paths included (they must name files that exist). Paths in the examples are relative to the
repository root, where their comments say to run them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tuning.sft_trainer import load_config

JOBS = sorted(
    p
    for p in (REPO / "examples").rglob("*")
    if p.suffix in (".yaml", ".yml", ".json") and "data" not in p.parts
)


def test_there_are_example_jobs_of_both_kinds():
    assert {p.suffix for p in JOBS} >= {".yaml", ".json"}, [str(p) for p in JOBS]


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_an_example_job_parses_with_every_key_taken(job: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    values = yaml.safe_load(job.read_text()) if job.suffix != ".json" else json.loads(job.read_text())
    config = load_config(["--config", str(job)])
    assert config.model.model_name_or_path == values["model_name_or_path"]
    assert config.train.output_dir == values["output_dir"]
    assert config.train.learning_rate == float(values["learning_rate"])
    assert config.train.num_train_epochs == values["num_train_epochs"]
    if job.suffix == ".json":  # fms-hf-tuning's hand-over reads the same file the same way
        monkeypatch.setenv("SFT_TRAINER_CONFIG_JSON_PATH", str(job))
        assert load_config([]) == config
