"""The run experience: steps-imply-strategy, progress lines and bar, the end summary, loss.png."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
from transformers import TrainerControl, TrainerState

from tests.conftest import io_rows, write_json
from tuning.cli import main as cli
from tuning.config import parse_config
from tuning.outputs import write_loss_plot
from tuning.sft_trainer import run
from tuning.train.callbacks import TRAINING_LOGS_NAME
from tuning.train.progress import RunProgress

BASE = ["--model_name_or_path", "m", "--training_data_path", "d", "--output_dir", "o"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_step_counts_imply_step_strategies(caplog):
    with caplog.at_level(logging.INFO, logger="tuning.config.parser"):
        train = parse_config([*BASE, "--logging_steps", "1", "--save_steps", "5"]).train
    assert (train.logging_strategy, train.save_strategy, train.eval_strategy) == ("steps", "steps", "no")
    assert [r.getMessage() for r in caplog.records] == [
        "--logging_steps 1 without --logging_strategy: logging_strategy is steps",
        "--save_steps 5 without --save_strategy: save_strategy is steps",
    ]
    defaults = parse_config(BASE).train
    assert (defaults.logging_strategy, defaults.save_strategy) == ("epoch", "epoch")


def test_explicit_strategy_wins_and_config_file_keys_count(tmp_path):
    train = parse_config([*BASE, "--logging_steps=2", "--logging_strategy", "epoch"]).train
    assert (train.logging_strategy, train.logging_steps) == ("epoch", 2)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("eval_steps: 3\nsave_steps: 4\nsave_strategy: epoch\n")
    train = parse_config([*BASE, "--config", str(config_file)]).train
    assert (train.eval_strategy, train.save_strategy, train.logging_strategy) == ("steps", "epoch", "epoch")


def state_at(step: int, max_steps: int = 8) -> TrainerState:
    state = TrainerState(max_steps=max_steps, num_train_epochs=2)
    state.global_step, state.epoch = step, step / 4
    return state


def test_plain_progress_lines_when_not_a_terminal(caplog):
    progress = RunProgress(tty=False, every_seconds=3600)
    args = parse_config([*BASE, "--logging_steps", "2"]).train
    with caplog.at_level(logging.INFO, logger="tuning"):
        progress.on_train_begin(args, state_at(0), TrainerControl())
        progress.on_step_end(args, state_at(1), TrainerControl())  # under every_seconds: no line
        progress.on_log(args, state_at(2), TrainerControl(), logs={"loss": 2.5, "trained_tokens": 40})
        progress.on_log(args, state_at(2), TrainerControl(), logs={"train_runtime": 1.0})  # not a loss
    lines = [r.getMessage() for r in caplog.records if r.name == "tuning"]
    assert lines[0] == "training: 8 steps, 2 epochs, logging every 2 steps, saving every epoch"
    assert len(lines) == 2
    assert re.fullmatch(
        r"step 2/8 \(25%\) \| epoch 0\.50 \| loss 2\.5000 \| \d+ tokens/s \| elapsed 0:00:\d\d \| ETA 0:00:\d\d",
        lines[1],
    ), lines[1]


def test_progress_bar_on_a_terminal(capsys):
    progress = RunProgress(tty=True)
    args = parse_config(BASE).train
    progress.on_train_begin(args, state_at(0), TrainerControl())
    progress.on_step_end(args, state_at(3), TrainerControl())
    progress.on_log(args, state_at(3), TrainerControl(), logs={"loss": 1.25, "eval_loss": 1.5})
    assert progress.bar.n == 3
    assert progress.bar.postfix == "epoch 0.75 | loss 1.2500 | eval_loss 1.5000"
    progress.on_train_end(args, state_at(3), TrainerControl())
    err = capsys.readouterr().err
    assert "training:" in err and "3/8" in err and "loss 1.2500" in err


def write_logs(folder, train: list[float], valid: dict[int, float]):
    records = [{"name": "training_loss", "data": {"step": i + 1, "value": v}} for i, v in enumerate(train)]
    records += [{"name": "validation_loss", "data": {"step": s, "value": v}} for s, v in valid.items()]
    (folder / TRAINING_LOGS_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_command_draws_png(tmp_path, capsys):
    write_logs(tmp_path, [3.0, 2.4, 2.0, 1.7, 1.5, 1.4, 1.35, 1.3], {4: 1.9, 8: 1.6})
    assert cli(["plot", str(tmp_path)]) == 0
    png = tmp_path / "loss.png"
    assert capsys.readouterr().out.strip() == str(png)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 10_000  # two lines, axes and legend; an empty figure is ~5 kB
    assert cli(["plot", str(tmp_path), "--out", str(tmp_path / "other.png")]) == 0
    assert (tmp_path / "other.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_command_errors(tmp_path, capsys, monkeypatch):
    assert cli(["plot", str(tmp_path)]) == 1
    assert f"no {TRAINING_LOGS_NAME} in {tmp_path}" in capsys.readouterr().err
    write_logs(tmp_path, [1.0], {})
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert cli(["plot", str(tmp_path)]) == 1
    assert "pip install 'tuning[plot]'" in capsys.readouterr().err
    assert write_loss_plot(tmp_path) is None  # at the end of a run: skipped, never raised
    assert not (tmp_path / "loss.png").exists()


SUMMARY_FIELDS = {
    "finished_at", "steps", "epochs", "train_seconds", "trained_tokens", "trained_tokens_per_second",
    "peak_memory_bytes", "final_loss", "best_loss", "mean_train_loss", "final_validation_loss",
    "best_validation_loss", "rows", "rows_kept", "samples", "samples_kept", "data_audit", "output_dir", "checkpoints", "best_model_checkpoint",
    "save_model_dir", "loss_plot", "trackers", "padding_free", "final_mean_token_accuracy",
    "final_validation_mean_token_accuracy", "best_validation_mean_token_accuracy", "eval_generations",
    "early_stopping", "serve_check",
}  # fmt: skip


@pytest.mark.slow
def test_run_summary_has_every_field_and_loss_png(tmp_path, tiny_model_dir, caplog):
    train = write_json(tmp_path / "train.json", io_rows(2))
    out = tmp_path / "out"
    argv = [
        *("--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(train)),
        *("--validation_data_path", str(train), "--output_dir", str(out), "--torch_dtype", "float32"),
        *("--use_flash_attn", "false", "--per_device_train_batch_size", "4", "--max_steps", "4"),
        *("--logging_steps", "1", "--eval_steps", "2", "--save_steps", "2"),
        *("--save_model_dir", str(tmp_path / "final")),
    ]
    with caplog.at_level(logging.INFO, logger="tuning"):
        summary = run(parse_config(argv))
    written = json.loads((out / "run_summary.json").read_text())
    assert set(written) == SUMMARY_FIELDS
    assert written["steps"] == 4
    assert written["checkpoints"] == [str(out / "checkpoint-2"), str(out / "checkpoint-4")]
    assert written["save_model_dir"] == str(tmp_path / "final")
    assert written["loss_plot"] == str(out / "loss.png")
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert written["trackers"] == {}
    assert written["best_loss"] <= written["final_loss"]
    assert written["best_validation_loss"] <= written["final_validation_loss"]
    assert written["trained_tokens"] == summary["trained_tokens"] > 0
    messages = [r.getMessage() for r in caplog.records]
    assert "training: 4 steps, 1 epochs, logging every 1 steps, saving every 2 steps" in messages
    assert sum(m.startswith("step ") for m in messages) == 6  # 4 training logs + 2 evaluations
    assert any(m.startswith("model ") and "parameters trainable" in m for m in messages)
