"""Conventions people bring from fms-hf-tuning, TRL and transformers: the job in the environment
(``SFT_TRAINER_CONFIG_JSON_PATH`` / ``SFT_TRAINER_CONFIG_JSON_ENV_VAR``), extras, logs without progress
bars, ``--disable_tqdm`` and ``--enable_jit_checkpoint``. (The real run from the job variable:
tests/test_model_card.py.)"""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
import signal
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerControl, TrainerState

from tests.conftest import REPO
from tuning import launch
from tuning.config import parse_config
from tuning.config.parser import build_parser
from tuning.errors import UserError
from tuning.files import JOB_PATH_ENV, JOB_TEXT_ENV
from tuning.logs import setup_logging
from tuning.train.progress import RunProgress

# fms-hf-tuning's documented job (build/README.md), as its users pass it
FMS_JOB = {
    "model_name_or_path": "/llama/7B",
    "training_data_path": "/data/twitter_complaints.json",
    "output_dir": "/output/llama-7b-pt-multigpu",
    "num_train_epochs": 5.0,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "save_strategy": "epoch",
    "learning_rate": 0.03,
    "weight_decay": 0.0,
    "lr_scheduler_type": "cosine",
    "logging_steps": 1.0,
    "packing": False,
    "include_tokens_per_second": True,
    "response_template": "\n### Label:",
    "dataset_text_field": "output",
    "use_flash_attn": False,
    "torch_dtype": "bfloat16",
    "tokenizer_name_or_path": "/llama/7B",
}


def encoded(job) -> str:
    return base64.b64encode(json.dumps(job).encode("ascii")).decode("ascii")  # fms-hf-tuning's encode_json


def test_the_job_in_the_environment_is_the_config_file(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(JOB_TEXT_ENV, encoded(FMS_JOB))
    with caplog.at_level(logging.INFO, logger="tuning.config.parser"):
        config = parse_config([])
    assert config.model.model_name_or_path == "/llama/7B" and config.data.response_template == "\n### Label:"
    assert (config.train.learning_rate, config.train.num_train_epochs) == (0.03, 5.0)
    assert config.train.logging_strategy == "steps"  # logging_steps in the job implies steps, as on the CLI
    assert f"reading the job ${JOB_TEXT_ENV}; command-line flags override it" in caplog.messages
    # one precedence rule: flags on the command line override the job
    assert parse_config(["--learning_rate", "0.5"]).train.learning_rate == 0.5
    # both variables set: the encoded job wins, as in fms-hf-tuning's sft_trainer
    path_job = tmp_path / "job.json"
    path_job.write_text(json.dumps({**FMS_JOB, "learning_rate": 0.25}))
    monkeypatch.setenv(JOB_PATH_ENV, str(path_job))
    assert parse_config([]).train.learning_rate == 0.03
    monkeypatch.delenv(JOB_TEXT_ENV)
    assert parse_config([]).train.learning_rate == 0.25
    # an explicit --config is the file; the variable is then not read at all
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("model_name_or_path: m\ntraining_data_path: d\noutput_dir: o\nlearning_rate: 0.125\n")
    assert parse_config(["--config", str(explicit)]).train.learning_rate == 0.125


def test_a_launcher_job_file_runs_under_the_trainer_too(monkeypatch, tmp_path, caplog):
    job = tmp_path / "job.yaml"
    job.write_text(
        "model_name_or_path: m\ntraining_data_path: d\noutput_dir: o\naccelerate_launch_args:\n  num_processes: 2\n"
    )
    monkeypatch.setenv(JOB_PATH_ENV, str(job))
    with caplog.at_level(logging.INFO, logger="tuning.config.parser"):
        assert parse_config([]).model.model_name_or_path == "m"
    assert any(
        "accelerate_launch_args is read by tuning launch only; ignored here" in m for m in caplog.messages
    )
    assert parse_config(["--config", str(job)]).model.model_name_or_path == "m"  # the same file as --config


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not base64!", "is not base64"),
        (base64.b64encode(b"{not json").decode(), "is not base64-encoded JSON"),
        (base64.b64encode(b"[1, 2]").decode(), "must hold a JSON object"),
        (base64.b64encode(pickle.dumps(FMS_JOB)).decode(), "holds a pickle, which is never loaded"),
        (
            encoded({**FMS_JOB, "learnig_rate": 1}),
            "unknown key 'learnig_rate' in job .*did you mean --learning_rate",
        ),
    ],
)
def test_bad_jobs_in_the_environment_are_user_errors(monkeypatch, value, message):
    monkeypatch.setenv(JOB_TEXT_ENV, value)
    with pytest.raises(UserError, match=message):
        parse_config([])


def test_missing_job_file_named_with_its_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(JOB_PATH_ENV, str(tmp_path / "nope.json"))
    with pytest.raises(
        UserError, match=rf"job file {tmp_path}/nope.json \(\${JOB_PATH_ENV}\) does not exist"
    ):
        parse_config([])


def test_launch_takes_the_encoded_job_and_keeps_it_out_of_the_ranks(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, env):
        seen["config"] = json.loads(Path(cmd[cmd.index("--config") + 1]).read_text())
        seen["env"] = env
        return 0, None

    monkeypatch.setattr(launch, "_run_forwarding_signals", fake_run)
    job = {
        "output_dir": str(tmp_path / "out"),
        "learning_rate": 0.1,
        "accelerate_launch_args": {"num_processes": 1},
    }
    monkeypatch.setenv(JOB_TEXT_ENV, encoded(job))
    monkeypatch.setenv(JOB_PATH_ENV, str(tmp_path / "ignored.json"))
    assert launch.main([]) == 0
    assert seen["config"] == {"output_dir": str(tmp_path / "out"), "learning_rate": 0.1}
    # the ranks read their job from --config only: no second source left in their environment
    assert JOB_TEXT_ENV not in seen["env"] and JOB_PATH_ENV not in seen["env"]
    assert (tmp_path / "out" / launch.COMPLETE_MARKER).is_file()


def test_no_library_progress_bars_when_stderr_is_not_a_terminal(monkeypatch):
    import datasets
    import huggingface_hub
    import transformers

    captured = io.StringIO()  # not a terminal, like a log file or a CI pipe
    monkeypatch.setattr(sys, "stderr", captured)
    try:
        setup_logging()
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert huggingface_hub.utils.are_progress_bars_disabled()
        assert not datasets.is_progress_bar_enabled()
        for _ in transformers.utils.logging.tqdm(range(3), desc="Loading weights"):
            pass
        assert captured.getvalue() == ""
    finally:
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()


def test_disable_tqdm_gives_plain_lines_on_a_terminal(caplog):
    args = parse_config(
        [
            "--model_name_or_path",
            "m",
            "--training_data_path",
            "d",
            "--output_dir",
            "o",
            "--disable_tqdm",
            "true",
        ]
    ).train
    progress = RunProgress(tty=True, every_seconds=3600)
    state = TrainerState(max_steps=4, num_train_epochs=1)
    with caplog.at_level(logging.INFO, logger="tuning"):
        progress.on_train_begin(args, state, TrainerControl())
        state.global_step, state.epoch = 2, 0.5
        progress.on_log(args, state, TrainerControl(), logs={"loss": 1.5})
    assert progress.bar is None
    assert any(m.startswith("step 2/4 (50%) | epoch 0.50 | loss 1.5000") for m in caplog.messages)


def test_enable_jit_checkpoint_is_our_sigterm_checkpoint(tokenizer, tmp_path, caplog):
    """transformers' JIT checkpoint (save on SIGTERM) is what every run here does; its own handler and
    callback stay out of the way of ours."""
    import datasets

    from tuning.config.args import TrainArgs
    from tuning.data import DataStats, PreparedData
    from tuning.model import PrecisionPlan
    from tuning.testing.tiny_model import build_model
    from tuning.train.trainer import build_trainer

    assert "always on here" in build_parser().format_help()
    args = TrainArgs(output_dir=str(tmp_path), enable_jit_checkpoint=True, use_cpu=True, report_to="none")
    data = PreparedData(
        datasets.Dataset.from_list([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}]),
        None,
        "pretokenized",
        DataStats(),
    )
    model = build_model(len(tokenizer))
    model.config.use_cache = False
    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.INFO, logger="tuning.train.trainer"):
        trainer = build_trainer(
            args, model, tokenizer, data, PrecisionPlan(torch.float32, None, torch.float32)
        )
    assert signal.getsignal(signal.SIGTERM) is before
    assert not [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "JITCheckpointCallback"]
    assert (
        "--enable_jit_checkpoint: SIGTERM always saves a checkpoint here; nothing to switch on"
        in caplog.messages
    )


def test_all_extra_holds_every_optional_part():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    from tuning.trackers import REGISTRY

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (everything,) = [Requirement(r) for r in extras["all"]]
    assert everything.name == "tuning"  # the project's own extras, so every pin lives in one place
    trackers = {extra for _, extra, _ in REGISTRY.values() if extra}
    assert trackers == {"aim", "tensorboard", "mlflow", "wandb", "clearml", "trackio", "hf_resource_scanner"}
    assert trackers <= everything.extras
    # every extra is in all, except the developer tools, what compiles against CUDA, and kernels (the
    # 0.18.x transformers 5.24 accepts is not on the registry yet: pyproject.toml says so), and liger
    # (Triton: a CUDA GPU's kernels, pointless elsewhere)
    assert set(extras) - {"all", "dev", "flash-attn", "kernels", "liger"} == everything.extras
    assert "matplotlib" not in " ".join(
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    )
