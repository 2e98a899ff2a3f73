"""Checkpoint bookkeeping without training: commit marker and manifest, verification, crash-safe
deletion, leftovers, rotation, the resume decision and what a checkpoint must share with the run
resuming from it, the training log across restarts, and the stop-signal handler."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from tuning.errors import UserError
from tuning.files import TOMBSTONE_PREFIX, delete_folder, staging_folder
from tuning.train.callbacks import TRAINING_LOGS_NAME, TrainingLogCallback, continue_training_logs
from tuning.train.checkpoint_format import (
    COMPLETE_MARKER,
    IN_PROGRESS,
    begin_checkpoint,
    commit_checkpoint,
    has_optimizer_state,
    latest_complete_checkpoint,
    list_checkpoints,
    read_marker,
    verify_checkpoint,
)
from tuning.train.fingerprint import data_fingerprint, model_fingerprint
from tuning.train.records import new_record_path, pending_dir, promote_pending, record_path, start_pending
from tuning.train.resume import check_fits, resume_checkpoint
from tuning.train.run_folder import clean_output_dir, prune_checkpoints
from tuning.train.signals import StopOnSignal, interrupted_exit_code


def make_checkpoint(
    root: Path, step: int, *, complete: bool = True, state: bool = True, optimizer: bool = True, record=None
) -> Path:
    """A checkpoint folder with real files of each kind a Trainer writes (safetensors, torch zip, JSON)."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.full((4, 4), float(step))}, folder / "model.safetensors")
    if optimizer:
        torch.save({"state": {0: torch.zeros(4)}}, folder / "optimizer.pt")
        torch.save({"last_epoch": step}, folder / "scheduler.pt")
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": step / 4}))
    if complete:
        commit_checkpoint(folder, step, step / 4, record)
    return folder


def names(folders) -> list[str]:
    return [Path(f).name for f in folders]


def test_commit_writes_a_manifest_marker_last_and_only_marked_folders_count(tmp_path):
    make_checkpoint(tmp_path, 9)
    ten = make_checkpoint(tmp_path, 10, record={"logging_window": {"loss_sum": [1.5], "last_logged_step": 8}})
    make_checkpoint(tmp_path, 12, complete=False)  # a kill mid-save
    (tmp_path / "checkpoint-x").mkdir()
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-9", "checkpoint-10", "checkpoint-12"]  # by step
    assert latest_complete_checkpoint(tmp_path) == ten
    assert read_marker(ten) == {
        "step": 10,
        "epoch": 2.5,
        "logging_window": {"loss_sum": [1.5], "last_logged_step": 8},
        "files": {
            name: (ten / name).stat().st_size
            for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
        },
    }
    assert not list(ten.glob(".*"))  # no temporary marker, no in-progress mark
    assert latest_complete_checkpoint(tmp_path / "missing") is None


def test_a_checkpoint_is_marked_in_progress_from_its_first_file_to_its_commit(tmp_path):
    old = make_checkpoint(tmp_path, 4)  # another history's checkpoint-4: replaced, never mixed
    folder = begin_checkpoint(old)
    assert sorted(p.name for p in folder.iterdir()) == [IN_PROGRESS]
    assert json.loads((folder / IN_PROGRESS).read_text())["pid"] == os.getpid()
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    (folder / "trainer_state.json").write_text("{}")
    commit_checkpoint(folder, 4, 1.0)
    assert not (folder / IN_PROGRESS).exists() and set(read_marker(folder)["files"]) == {
        "model.safetensors",
        "trainer_state.json",
    }


def test_verification_names_truncated_missing_and_replaced_files(tmp_path):
    intact = make_checkpoint(tmp_path, 2)
    assert verify_checkpoint(intact) is None

    truncated = make_checkpoint(tmp_path, 4)
    size = (truncated / "model.safetensors").stat().st_size
    os.truncate(truncated / "model.safetensors", size - 3)
    assert (
        verify_checkpoint(truncated)
        == f"model.safetensors is {size - 3:,} bytes, {size:,} when it was committed"
    )

    missing = make_checkpoint(tmp_path, 6)
    (missing / "optimizer.pt").unlink()
    assert verify_checkpoint(missing) == "optimizer.pt is missing"

    # a marker without a manifest (an older version): the files' own structure still tells
    old = make_checkpoint(tmp_path, 8)
    (old / COMPLETE_MARKER).write_text(json.dumps({"step": 8, "epoch": 2.0}))
    os.truncate(old / "model.safetensors", 100)
    assert "model.safetensors is cut short" in verify_checkpoint(old)
    old_optimizer = make_checkpoint(tmp_path, 10)
    (old_optimizer / COMPLETE_MARKER).write_text(json.dumps({"step": 10, "epoch": 2.5}))
    with open(old_optimizer / "optimizer.pt", "r+b") as f:
        f.truncate(f.seek(0, 2) - 30)  # the zip directory at the end is gone
    assert verify_checkpoint(old_optimizer).startswith("optimizer.pt is damaged")
    old_state = make_checkpoint(tmp_path, 12)
    (old_state / COMPLETE_MARKER).write_text(json.dumps({"step": 12, "epoch": 3.0}))
    (old_state / "trainer_state.json").write_text('{"global_step": 1')
    assert verify_checkpoint(old_state).startswith("trainer_state.json is unreadable")


def test_a_kill_during_a_deletion_leaves_a_tombstone_that_the_next_start_removes(tmp_path, caplog):
    folder = make_checkpoint(tmp_path, 2)
    pid = os.fork()
    if pid == 0:  # a real process, SIGKILLed in the middle of deleting the folder
        original = os.unlink

        def unlink(*args, **kwargs):
            if unlink.calls == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            unlink.calls += 1
            return original(*args, **kwargs)

        unlink.calls = 0
        os.unlink = unlink
        delete_folder(folder)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    assert not folder.exists()  # never a half-deleted checkpoint-2
    [tombstone] = tmp_path.iterdir()
    assert (
        tombstone.name.startswith(f"{TOMBSTONE_PREFIX}checkpoint-2-") and len(list(tombstone.iterdir())) == 4
    )
    with caplog.at_level(logging.WARNING):
        clean_output_dir(tmp_path)
    assert list(tmp_path.iterdir()) == [] and "finished deleting" in caplog.text


def test_the_next_start_removes_what_it_can_prove_unfinished_and_nothing_else(tmp_path, caplog):
    complete = make_checkpoint(tmp_path, 2)
    (complete / IN_PROGRESS).write_text("{}")  # killed between the marker and removing the mark
    killed_in_save = make_checkpoint(tmp_path, 4, complete=False)  # has trainer_state.json, but marked
    (killed_in_save / IN_PROGRESS).write_text("{}")
    make_checkpoint(tmp_path, 6, complete=False, state=False)  # an older version's killed save
    foreign = make_checkpoint(tmp_path, 8, complete=False)  # e.g. written by another tool
    asked_for = make_checkpoint(tmp_path, 10, complete=False, state=False)
    (tmp_path / ".training_logs.jsonl.tmp").write_text("half")
    final = tmp_path / "final"
    half_built = staging_folder(final)  # a final model save killed halfway
    half_built.mkdir()
    (half_built / "model.safetensors").write_text("half")
    with caplog.at_level(logging.WARNING):
        removed = clean_output_dir(tmp_path, keep=asked_for, final_dir=final)
    assert names(removed) == ["checkpoint-4", "checkpoint-6"]
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-2", "checkpoint-8", "checkpoint-10"]
    assert not (complete / IN_PROGRESS).exists() and (foreign / "trainer_state.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("checkpoint-")) == []
    assert "removing incomplete checkpoint" in caplog.text and "ignoring" in caplog.text
    assert "final model save a kill interrupted" in caplog.text


def test_rotation_keeps_the_best_and_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    best = str(tmp_path / "checkpoint-4")
    deleted = prune_checkpoints(tmp_path, 1, best, resumed_step=0, written_steps={2, 4, 6, 8})
    assert names(deleted) == ["checkpoint-2", "checkpoint-6"]
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-4", "checkpoint-8"]
    assert prune_checkpoints(tmp_path, None, None, resumed_step=0, written_steps={4, 8}) == []
    assert not list(tmp_path.glob(f"{TOMBSTONE_PREFIX}*"))


def test_rotation_deletes_an_abandoned_history_and_never_incomplete_newcomers(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)  # an old run
    make_checkpoint(tmp_path, 8, complete=False)  # being written right now by someone: not ours to judge
    deleted = prune_checkpoints(tmp_path, None, None, resumed_step=2, written_steps={4})
    assert names(deleted) == ["checkpoint-6"]  # later than our start, not written by us
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-2", "checkpoint-4", "checkpoint-8"]


def args(output_dir: Path, value: str | None, save_only_model: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        output_dir=str(output_dir),
        resume_from_checkpoint=value,
        should_save=True,
        save_only_model=save_only_model,
    )


@pytest.mark.parametrize("value", [None, "true", "True"])
def test_auto_resume_picks_the_latest_complete_checkpoint_and_logs_it(tmp_path, caplog, value):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 6, complete=False, state=False)
    with caplog.at_level(logging.INFO, logger="tuning"):
        assert resume_checkpoint(args(tmp_path, value)) == str(tmp_path / "checkpoint-4")
    assert f"resuming from {tmp_path / 'checkpoint-4'}: step 4, epoch 1" in caplog.text


def test_auto_resume_skips_a_damaged_checkpoint_naming_it_and_refuses_when_all_are(tmp_path, caplog):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)
    os.truncate(tmp_path / "checkpoint-4" / "model.safetensors", 50)
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(args(tmp_path, None)) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-4 is damaged (model.safetensors is 50 bytes" in caplog.text
    assert "resuming from checkpoint-2, the newest intact checkpoint, instead" in caplog.text
    (tmp_path / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(
        UserError,
        match=r"every complete checkpoint in .* is damaged \(checkpoint-4: .*; checkpoint-2: optimizer.pt is missing\)",
    ):
        resume_checkpoint(args(tmp_path, None))
    with pytest.raises(
        UserError, match=r"--resume_from_checkpoint .*checkpoint-4 is damaged: model.safetensors"
    ):
        resume_checkpoint(args(tmp_path, str(tmp_path / "checkpoint-4")))


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


def fingerprint(**settings) -> dict:
    base = {"effective_batch": 4, "seed": 42, "learning_rate": 1e-3}
    return {
        "model": {
            "description": "llama (2 layers, hidden size 32, vocabulary 362): 41,760 parameters",
            "digest": "aa",
        },
        "data": {"rows": 16, "tokens": 1062, "digest": "d1"},
        "settings": {**base, **settings},
        "batch_layout": [2, 2, 1],
    }


def test_a_checkpoint_of_another_model_is_a_user_error_even_when_asked_for(tmp_path):
    folder = make_checkpoint(tmp_path, 4, record={"fingerprint": fingerprint()})
    other = {
        **fingerprint(),
        "model": {"description": "llama (3 layers, ...): 60,000 parameters", "digest": "bb"},
    }
    for explicit in (False, True):
        with pytest.raises(UserError) as e:
            check_fits(folder, args(tmp_path, None), other, explicit=explicit)
        assert str(e.value).startswith(
            "checkpoint-4 was written for a model with llama (2 layers, hidden size 32, vocabulary 362): 41,760 "
            "parameters; this model has llama (3 layers, ...): 60,000 parameters. Resume with the model"
        )


def test_changed_settings_are_refused_on_auto_resume_and_warned_about_when_asked_for(tmp_path, caplog):
    folder = make_checkpoint(tmp_path, 4, record={"fingerprint": fingerprint()})
    check_fits(folder, args(tmp_path, None), fingerprint(), explicit=False)  # the same run: fine
    changed = fingerprint(effective_batch=8, seed=7)
    changed["batch_layout"] = [4, 2, 1]
    changed["data"] = {"rows": 20, "tokens": 1300, "digest": "d2"}
    with pytest.raises(UserError) as e:
        check_fits(folder, args(tmp_path, None), changed, explicit=False)
    assert str(e.value) == (
        "checkpoint-4 was written by a different run: effective_batch 4 (2 per device × 2 accumulated × 1 "
        "processes) → 8 (4 per device × 2 accumulated × 1 processes); seed 42 → 7; "
        "training data 16 rows, 1062 tokens → 20 rows, 1300 tokens. Rerun with its settings, pass "
        f"--resume_from_checkpoint {folder} to continue from it anyway, or --resume_from_checkpoint false "
        "to start over"
    )
    same_size = fingerprint()
    same_size["data"] = {"rows": 16, "tokens": 1062, "digest": "d3"}
    with pytest.raises(UserError, match="training data: same 16 rows and 1062 tokens, other content"):
        check_fits(folder, args(tmp_path, None), same_size, explicit=False)
    with caplog.at_level(logging.WARNING):
        check_fits(folder, args(tmp_path, str(folder)), changed, explicit=True)
    assert "as asked, although it is not the same run: effective_batch" in caplog.text
    caplog.clear()
    relaid = fingerprint()
    relaid["batch_layout"] = [2, 1, 2]  # twice the processes, half the accumulation: the same steps
    with caplog.at_level(logging.INFO):
        check_fits(folder, args(tmp_path, None), relaid, explicit=False)
    assert (
        "the same effective batch, formed as 2 per device × 2 accumulated × 1 processes → 2 per"
        in caplog.text
    )


def test_a_checkpoint_without_optimizer_state_is_refused_unless_this_run_saves_none_either(tmp_path, caplog):
    folder = make_checkpoint(tmp_path, 4, optimizer=False, record={"fingerprint": fingerprint()})
    assert not has_optimizer_state(folder) and has_optimizer_state(make_checkpoint(tmp_path, 6))
    with pytest.raises(UserError, match="checkpoint-4 was written by a different run: optimizer state: none"):
        check_fits(folder, args(tmp_path, None), fingerprint(), explicit=False)
    with caplog.at_level(logging.WARNING):
        check_fits(folder, args(tmp_path, None, save_only_model=True), fingerprint(), explicit=False)
    assert (
        "checkpoint-4 has no optimizer state (--save_only_model): the optimizer starts afresh" in caplog.text
    )


def log_lines(steps) -> str:
    return "".join(
        json.dumps({"name": "training_loss", "data": {"step": s, "value": 1.0}}) + "\n" for s in steps
    )


def logged_steps(path: Path) -> list[int]:
    return [json.loads(line)["data"]["step"] for line in path.read_text().splitlines()]


def test_a_resume_drops_only_a_killed_runs_records_past_the_newest_checkpoint(tmp_path):
    make_checkpoint(tmp_path, 2)
    live = tmp_path / TRAINING_LOGS_NAME
    live.write_text(log_lines([1, 2, 3]) + '{"name": "training_lo')  # the last line cut by a kill
    continue_training_logs(tmp_path, 2)
    assert logged_steps(live) == [1, 2] and not pending_dir(tmp_path).exists()
    assert record_path(tmp_path, TRAINING_LOGS_NAME) == live


def test_records_of_surviving_checkpoints_stay_until_the_new_run_commits(tmp_path):
    """Starting over (or from an earlier checkpoint) keeps the old log and resolved config as they are:
    a kill before the new run's first commit leaves checkpoints and their history together."""
    for step in (2, 4):
        make_checkpoint(tmp_path, step)
    live, config = tmp_path / TRAINING_LOGS_NAME, tmp_path / "resolved_config.yaml"
    live.write_text(log_lines([1, 2, 3, 4]))
    config.write_text("old: true\n")
    run_id = start_pending(tmp_path)
    (pending_dir(tmp_path) / "resolved_config.yaml").write_text("new: true\n")
    continue_training_logs(tmp_path, 0)  # --resume_from_checkpoint false
    callback = TrainingLogCallback(str(tmp_path))
    state = SimpleNamespace(is_world_process_zero=True, epoch=0.25, global_step=1)
    callback.on_log(None, state, None, logs={"loss": 2.0})
    assert logged_steps(live) == [1, 2, 3, 4] and config.read_text() == "old: true\n"
    assert logged_steps(pending_dir(tmp_path) / TRAINING_LOGS_NAME) == [1]

    # a kill here, then a restart: the pending records of a run that never committed are discarded
    clean_output_dir(tmp_path)
    assert not pending_dir(tmp_path).exists() and logged_steps(live) == [1, 2, 3, 4]

    # the same run again, this time committing: its records replace the old ones in one step each
    (tmp_path / "aim_tracker.json").write_text('{"run_id": "old"}')
    run_id = start_pending(tmp_path)
    (pending_dir(tmp_path) / "resolved_config.yaml").write_text("new: true\n")
    new_record_path(tmp_path, "aim_tracker.json").write_text('{"run_id": "new"}')
    assert json.loads((tmp_path / "aim_tracker.json").read_text()) == {"run_id": "old"}
    continue_training_logs(tmp_path, 0)
    callback.on_log(None, state, None, logs={"loss": 2.0})
    make_checkpoint(tmp_path, 6, record={"run_id": run_id})  # killed right after this commit ...
    clean_output_dir(tmp_path)  # ... the restart finishes moving the records in
    assert logged_steps(live) == [1] and config.read_text() == "new: true\n"
    assert json.loads((tmp_path / "aim_tracker.json").read_text()) == {"run_id": "new"}
    assert not pending_dir(tmp_path).exists() and promote_pending(tmp_path) == []


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


def test_the_data_fingerprint_sees_content_order_and_dropped_rows():
    import datasets

    rows = {"input_ids": [[1, 2, 3], [4, 5], [6]], "labels": [[-100, 2, 3], [-100, 5], [6]]}
    base = data_fingerprint(datasets.Dataset.from_dict(rows))
    assert (base["rows"], base["tokens"]) == (3, 6)
    assert data_fingerprint(datasets.Dataset.from_dict(rows)) == base  # deterministic across processes
    edited = {**rows, "labels": [[-100, 2, 3], [-100, -100], [6]]}  # one label masked: same sizes
    assert data_fingerprint(datasets.Dataset.from_dict(edited))["digest"] != base["digest"]
    reordered = datasets.Dataset.from_dict(rows).select([2, 0, 1])
    assert data_fingerprint(reordered)["digest"] != base["digest"]
    kept = datasets.Dataset.from_dict(rows).filter(lambda r: len(r["input_ids"]) > 1)
    assert (data_fingerprint(kept)["rows"], data_fingerprint(kept)["tokens"]) == (2, 5)
    assert data_fingerprint(iter([])) is None  # a stream can't be read twice


def test_the_model_fingerprint_sees_shapes_and_what_trains():
    from tuning.testing.tiny_model import build_model

    model = build_model(vocab_size=300)
    fp = model_fingerprint(model)
    # 300 x 32 embeddings, an untied 300 x 32 head, 18,592 in the two layers and the final norm
    assert fp["description"] == (
        "llama (2 layers, hidden size 32, vocabulary 300): 37,792 parameters, 37,792 trainable"
    )
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen = model_fingerprint(model)
    assert frozen["digest"] != fp["digest"] and frozen["description"].endswith(
        "37,792 parameters, 28,192 trainable"
    )
    assert (
        model_fingerprint(build_model(vocab_size=300, seed=1))["digest"] == fp["digest"]
    )  # weights don't count
