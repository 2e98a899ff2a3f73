"""Checkpoint bookkeeping without training: commit marker, leftovers, rotation, the resume decision,
log truncation, and the stop-signal handler."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuning.errors import UserError
from tuning.train.callbacks import truncate_training_logs
from tuning.train.checkpoints import (
    COMPLETE_MARKER,
    commit_checkpoint,
    latest_complete_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    remove_incomplete,
    resume_checkpoint,
)
from tuning.train.signals import StopOnSignal, interrupted_exit_code


def make_checkpoint(root: Path, step: int, *, complete: bool = True, state: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": step / 4}))
    if complete:
        commit_checkpoint(folder, step, step / 4)
    return folder


def names(folders) -> list[str]:
    return [Path(f).name for f in folders]


def test_commit_writes_the_marker_last_and_only_marked_folders_count(tmp_path):
    make_checkpoint(tmp_path, 9)
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 12, complete=False)  # a kill mid-save
    (tmp_path / "checkpoint-x").mkdir()
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-9", "checkpoint-10", "checkpoint-12"]  # by step
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert json.loads((tmp_path / "checkpoint-10" / COMPLETE_MARKER).read_text()) == {
        "step": 10,
        "epoch": 2.5,
    }
    assert not list((tmp_path / "checkpoint-10").glob(".*tmp"))
    assert latest_complete_checkpoint(tmp_path / "missing") is None


def test_leftovers_without_state_are_removed_whole_unmarked_ones_with_state_are_kept(tmp_path, caplog):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, complete=False, state=False)
    make_checkpoint(tmp_path, 6, complete=False)  # e.g. written by another tool
    with caplog.at_level(logging.WARNING):
        removed = remove_incomplete(tmp_path)
    assert names(removed) == ["checkpoint-4"]
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-2", "checkpoint-6"]
    assert "removing incomplete checkpoint" in caplog.text and "ignoring" in caplog.text


def test_rotation_keeps_the_best_and_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    best = str(tmp_path / "checkpoint-4")
    deleted = prune_checkpoints(tmp_path, 1, best, resumed_step=0, written_steps={2, 4, 6, 8})
    assert names(deleted) == ["checkpoint-2", "checkpoint-6"]
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-4", "checkpoint-8"]
    assert prune_checkpoints(tmp_path, None, None, resumed_step=0, written_steps={4, 8}) == []


def test_rotation_deletes_an_abandoned_history_and_never_incomplete_newcomers(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)  # an old run
    make_checkpoint(tmp_path, 8, complete=False)  # being written right now by someone: not ours to judge
    deleted = prune_checkpoints(tmp_path, None, None, resumed_step=2, written_steps={4})
    assert names(deleted) == ["checkpoint-6"]  # later than our start, not written by us
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-2", "checkpoint-4", "checkpoint-8"]


def args(output_dir: Path, value: str | None) -> SimpleNamespace:
    return SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=value, should_save=True)


@pytest.mark.parametrize("value", [None, "true", "True"])
def test_auto_resume_picks_the_latest_complete_checkpoint_and_logs_it(tmp_path, caplog, value):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 6, complete=False, state=False)
    with caplog.at_level(logging.INFO, logger="tuning"):
        assert resume_checkpoint(args(tmp_path, value)) == str(tmp_path / "checkpoint-4")
    assert f"resuming from {tmp_path / 'checkpoint-4'}: step 4, epoch 1" in caplog.text
    assert not (tmp_path / "checkpoint-6").exists()


def test_auto_resume_with_nothing_to_resume_starts_at_step_0(tmp_path):
    assert resume_checkpoint(args(tmp_path, None)) is None
    make_checkpoint(tmp_path, 2, complete=False, state=False)
    assert resume_checkpoint(args(tmp_path, "true")) is None


def test_false_starts_over_and_touches_nothing_yet(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, complete=False, state=False)
    assert resume_checkpoint(args(tmp_path, "false")) is None
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-2", "checkpoint-4"]


def test_an_explicit_path_is_used_even_unmarked_and_bad_paths_are_user_errors(tmp_path, caplog):
    other = make_checkpoint(tmp_path / "elsewhere", 6, complete=False)
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(args(tmp_path / "out", str(other))) == str(other)
    assert f"no {COMPLETE_MARKER}" in caplog.text
    with pytest.raises(UserError, match="no such folder; pass a checkpoint-N folder"):
        resume_checkpoint(args(tmp_path, str(tmp_path / "nope")))
    broken = make_checkpoint(tmp_path, 8, complete=False, state=False)
    with pytest.raises(UserError, match="has no readable trainer_state.json"):
        resume_checkpoint(args(tmp_path, str(broken)))


def test_log_truncation_drops_later_steps_and_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "training_logs.jsonl"
    records = [{"name": "training_loss", "data": {"step": s, "value": 1.0}} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"name": "training_lo')
    truncate_training_logs(path, 2)
    assert [json.loads(line)["data"]["step"] for line in path.read_text().splitlines()] == [1, 2]
    truncate_training_logs(path, 0)
    assert path.read_text() == ""


def test_a_stop_signal_is_recorded_not_acted_on_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM  # the process is still alive: the trainer decides
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C forces the way out
    assert signal.getsignal(signal.SIGTERM) is before
    assert (interrupted_exit_code(signal.SIGTERM), interrupted_exit_code(signal.SIGINT)) == (143, 130)
