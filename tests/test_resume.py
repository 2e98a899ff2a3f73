"""Resume end to end: kill -9 mid-step and mid-save, SIGTERM, ``false`` and PATH, best model + limit.

One uninterrupted run is the reference: 16 rows, batch 2 x accumulation 2 (4 steps per epoch), 6 steps
(so resuming at step 2 crosses an epoch boundary), a checkpoint every 2 steps, a loss line every step.
Interrupted runs are separate processes (tests/train_with_fault.py puts the fault at an exact moment):
forked children running the CLI's ``main``, which skips the 15 s of imports a fresh interpreter costs
here; the runs that resume are in-process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import io_rows, write_json
from tests.train_with_fault import inject
from tuning.config import parse_config
from tuning.sft_trainer import main, run
from tuning.train import read_training_logs
from tuning.train.checkpoints import COMPLETE_MARKER, is_complete

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    train = write_json(root / "train.json", io_rows(2))

    def argv(out, *extra: str) -> list[str]:
        return [
            *("--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(train)),
            *("--output_dir", str(out), "--torch_dtype", "float32", "--use_flash_attn", "false"),
            *("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"),
            *("--max_steps", "6", "--learning_rate", "1e-3"),
            *("--save_strategy", "steps", "--save_steps", "2", "--logging_strategy", "steps"),
            *("--logging_steps", "1", *extra),
        ]

    reference = root / "reference"
    run(parse_config(argv(reference)))
    return root, argv, reference, losses(reference)


def losses(output_dir) -> dict[int, float]:
    records = read_training_logs(output_dir)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicated steps in the log: {steps}"
    return {r["step"]: r["value"] for r in records}


def fork_with_fault(fault: str, step: int, argv: list[str], log) -> tuple[int, str]:
    """The CLI's ``main`` in a forked child: a real separate process that can be SIGKILLed, without the
    15 s of imports a fresh interpreter costs here. Returns (exit code, -N if killed by N; stderr)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 99
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # noqa: SIM115 (closed by _exit)
            inject(fault, step)
            code = main(argv)
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), log.read_text()


def complete_steps(output_dir) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*") if is_complete(p))


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


def test_reference_run_commits_every_checkpoint(job):
    _, _, reference, want = job
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    assert complete_steps(reference) == [2, 4, 6]
    marker = json.loads((reference / "checkpoint-4" / COMPLETE_MARKER).read_text())
    assert marker == {"step": 4, "epoch": 1.0}


def test_kill_9_in_a_step_and_in_a_save_then_rerun_matches_uninterrupted(job, caplog):
    root, argv, _, want = job
    out = root / "killed"

    code, stderr = fork_with_fault("kill-in-step", 3, argv(out), root / "killed-1.log")
    assert code == -signal.SIGKILL, stderr
    assert complete_steps(out) == [2]
    assert sorted(losses(out)) == [1, 2]

    code, stderr = fork_with_fault("kill-in-save", 4, argv(out), root / "killed-2.log")
    assert code == -signal.SIGKILL, stderr
    assert "resuming from" in stderr and "checkpoint-2: step 2, epoch 0.5" in stderr
    assert (out / "checkpoint-4").is_dir() and not is_complete(out / "checkpoint-4")  # the half-written one
    assert complete_steps(out) == [2]
    assert sorted(losses(out)) == [1, 2, 3, 4]

    with caplog.at_level(logging.INFO, logger="tuning"):
        run(parse_config(argv(out)))
    assert "removing incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    assert "checkpoint-2: step 2, epoch 0.5" in caplog.text
    assert complete_steps(out) == [2, 4, 6]
    assert_same_losses(losses(out), want)


def test_sigterm_finishes_the_step_saves_and_exits_143(job):
    root, argv, _, want = job
    out = root / "sigterm"

    code, stderr = fork_with_fault("sigterm-in-step", 3, argv(out), root / "sigterm.log")
    assert code == 143, stderr
    assert "interrupted: stopped by SIGTERM at step 3 after saving checkpoint-3" in stderr
    assert "stopped by SIGTERM" in (out / "error.log").read_text()  # the termination log
    assert complete_steps(out) == [2, 3]  # step 3 is no save step: the signal asked for it
    assert sorted(losses(out)) == [1, 2, 3]
    assert not (out / "run_summary.json").exists()

    run(parse_config(argv(out)))
    assert_same_losses(losses(out), want)


def test_resume_from_path_into_a_new_folder_and_save_model_dir_is_output_dir(job):
    root, argv, reference, want = job
    out = root / "from-path"
    checkpoint = reference / "checkpoint-4"  # an epoch boundary
    run(parse_config(argv(out, "--resume_from_checkpoint", str(checkpoint), "--save_model_dir", str(out))))
    assert_same_losses(losses(out), {5: want[5], 6: want[6]})
    assert complete_steps(out) == [6]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(root.glob(".from-path.tmp-*"))


def test_resume_false_starts_over_and_drops_the_old_history(job):
    root, argv, reference, want = job
    out = root / "start-over"
    shutil.copytree(reference, out)
    run(parse_config(argv(out, "--resume_from_checkpoint", "false", "--max_steps", "2")))
    got = losses(out)
    assert sorted(got) == [1, 2]  # the old run's steps 3-6 are gone from the log
    assert got[1] == pytest.approx(want[1], abs=1e-6)
    assert complete_steps(out) == [2]  # 4 and 6 belonged to the old run; auto-resume must not pick them
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["max_steps"] == 2


def test_best_model_survives_save_total_limit_1_and_is_the_saved_model(job, tiny_model_dir):
    root, argv, _, _ = job
    out = root / "best"
    validation = write_json(root / "validation.json", io_rows(1))
    extra = [
        *("--validation_data_path", str(validation), "--eval_strategy", "steps", "--eval_steps", "2"),
        *("--load_best_model_at_end", "true", "--metric_for_best_model", "loss"),
        # "best" = highest validation loss: the first evaluation, so best and newest differ
        *("--greater_is_better", "true", "--save_total_limit", "1", "--save_model_dir", str(out / "final")),
    ]
    run(parse_config(argv(out, *extra)))
    validation_losses = read_training_logs(out, "validation_loss")
    assert [r["step"] for r in validation_losses] == [2, 4, 6]
    values = [r["value"] for r in validation_losses]
    assert values[0] > values[1] > values[2]
    assert complete_steps(out) == [2, 6]  # the best (2) and the newest (6); 4 rotated away
    final = load_file(out / "final" / "model.safetensors")
    best = load_file(out / "checkpoint-2" / "model.safetensors")
    newest = load_file(out / "checkpoint-6" / "model.safetensors")
    name = "model.embed_tokens.weight"
    assert torch.equal(final[name], best[name]) and not torch.equal(final[name], newest[name])
