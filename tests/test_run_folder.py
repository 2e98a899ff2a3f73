"""The run folder's contract (``tuning/train/run_folder.py``): a run that fails before training leaves
``output_dir`` as it found it, for each kind of failure (none where there was none: no folder, no
``error.log``, no ``.pending/``, no ``.tuning.lock``), the memory plan is not printed before a mistake
that can be found first, and a run that succeeds removes an earlier run's ``error.log``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, text_rows, write_json
from tests.test_checkpoints import make_checkpoint
from tuning import sft_trainer
from tuning.errors import ERROR_LOG_NAME, Terminated
from tuning.lock import LOCK_NAME, OutputDirLock
from tuning.train.records import PENDING_DIR


def argv_for(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--training_data_path",
        str(data),
        "--dataset_text_field",
        "output",
        "--output_dir",
        str(out),
        "--max_steps",
        "1",
        "--torch_dtype",
        "float32",
        "--save_strategy",
        "no",
        *extra,
    ]


def _bad_data_config(tmp: Path) -> dict:
    config = tmp / "data.yaml"
    config.write_text("datasets:\n  - name: a\n    data_path: [x.json]\n", encoding="utf-8")
    return {"--data_config_path": str(config), "--training_data_path": None}


def _a_checkpoint_of_another_run(tmp: Path) -> dict:
    make_checkpoint(tmp / "out", 4, optimizer=False)  # auto-resume refuses it: no optimizer state
    return {}


def _terminated_while_loading(monkeypatch) -> None:
    def stop(*args, **kwargs):
        raise Terminated

    monkeypatch.setattr(sft_trainer, "load_model", stop)


# failure kind → (changes to the command line, or a setup; exit code; what the line says)
CASES = {
    "flag typo": (lambda t: {"--learning_rtae": "1e-5"}, 1, "learning_rtae"),
    "missing data file": (lambda t: {"--training_data_path": str(t / "missing.json")}, 1, "does not exist"),
    "bad model path": (lambda t: {"--model_name_or_path": str(t / "no-such-model")}, 1, "no-such-model"),
    "bad data config": (_bad_data_config, 1, "data_path"),
    "data the template never matches": (lambda t: {"--response_template": "never there"}, 1, "never there"),
    "adapter target the model lacks": (
        lambda t: {"--peft_method": "lora", "--target_modules": "qkv_proj"},
        1,
        "qkv_proj",
    ),
}


def apply(argv: list[str], change: dict) -> list[str]:
    out = list(argv)
    for flag, value in change.items():
        if flag in out:
            i = out.index(flag)
            del out[i : i + 2]
        if value is not None:
            out += [flag, value]
    return out


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (the lock file by name only: its holder line is rewritten
    by each run that takes it)."""
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): (None if p.is_dir() or p.name == LOCK_NAME else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def previous_run(out: Path) -> None:
    """What an earlier, successful run leaves."""
    out.mkdir()
    (out / "resolved_config.yaml").write_text("learning_rate: 1.0e-05\n")
    record = {"name": "training_loss", "data": {"epoch": 1.0, "step": 1, "value": 2.0, "timestamp": 0}}
    (out / "training_logs.jsonl").write_text(json.dumps(record) + "\n")
    (out / "loss.png").write_bytes(b"an earlier run's plot")
    (out / "run_summary.json").write_text("{}\n")
    (out / LOCK_NAME).write_text("{}\n")


@pytest.fixture
def data(tmp_path) -> Path:
    return write_json(tmp_path / "data.json", text_rows(1))


@pytest.mark.parametrize("existed", [False, True], ids=["new folder", "earlier run's folder"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_that_fails_before_training_leaves_the_folder_as_found(
    case, existed, tmp_path, tiny_model_dir, data, monkeypatch, capsys
):
    monkeypatch.delenv("TERMINATION_LOG_FILE", raising=False)
    out = tmp_path / "out"
    if existed:
        previous_run(out)
    change, code, says = CASES[case]
    argv = apply(argv_for(tiny_model_dir, data, out), change(tmp_path))
    before, around = snapshot(out), sorted(p.name for p in tmp_path.iterdir())
    assert sft_trainer.main(argv) == code
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and says in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == around
    if not existed:
        assert not out.exists()  # no folder, so no error.log, .pending/ nor .tuning.lock either
    else:
        after = snapshot(out)
        assert after.pop(ERROR_LOG_NAME) == (line + "\n").encode()
        assert after == before
    if case in ("flag typo", "missing data file", "bad model path", "bad data config"):
        assert "peak" not in err  # found before the memory plan is printed


@pytest.mark.parametrize("existed", [False, True], ids=["new folder", "earlier run's folder"])
def test_a_signal_during_start_up_leaves_the_folder_as_found(
    existed, tmp_path, tiny_model_dir, data, monkeypatch, capsys
):
    monkeypatch.delenv("TERMINATION_LOG_FILE", raising=False)
    out = tmp_path / "out"
    if existed:
        previous_run(out)
    before = snapshot(out)
    _terminated_while_loading(monkeypatch)
    assert sft_trainer.main(argv_for(tiny_model_dir, data, out)) == 143
    after = snapshot(out)
    if existed:
        assert after.pop(ERROR_LOG_NAME).decode().startswith("interrupted: stopped by SIGTERM")
    assert after == before


def test_a_refused_resume_leaves_the_earlier_runs_folder_as_found(tmp_path, tiny_model_dir, data, capsys):
    out = tmp_path / "out"
    previous_run(out)
    _a_checkpoint_of_another_run(tmp_path)
    before = snapshot(out)
    argv = [a for a in argv_for(tiny_model_dir, data, out) if a not in ("--save_strategy", "no")]
    assert sft_trainer.main(argv) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint-4 was written by a different run: optimizer state: none" in line
    after = snapshot(out)
    assert after.pop(ERROR_LOG_NAME) == (line + "\n").encode()
    assert after == before


def test_a_run_that_succeeds_removes_the_earlier_error_log(tmp_path, tiny_model_dir, data, monkeypatch):
    monkeypatch.delenv("TERMINATION_LOG_FILE", raising=False)
    out = tmp_path / "out"
    previous_run(out)
    stale = "interrupted: stopped by SIGTERM at step 101 after saving checkpoint-101; rerun the same command"
    (out / ERROR_LOG_NAME).write_text(stale + "\n")
    assert sft_trainer.main(argv_for(tiny_model_dir, data, out)) == 0
    assert not (out / ERROR_LOG_NAME).exists()
    assert not (out / PENDING_DIR).exists()
    assert "learning_rate: 1.0e-05" not in (out / "resolved_config.yaml").read_text()  # this run's records


WAITER = """
import sys, time
from tuning.lock import OutputDirLock
lock = OutputDirLock(sys.argv[1], wait_seconds=30, poll_seconds=0.02)
print("waiting", flush=True)
lock.acquire()
print(lock.created_folder, lock.created_file, flush=True)
time.sleep(30)
"""


def test_a_waiter_on_a_lock_file_its_holder_removed_locks_the_new_one(tmp_path):
    """The holder of a lock it created removes file and folder as it leaves; a run that waited on that
    file must not run beside a third one that creates the path afresh: it locks what the path names."""
    out = tmp_path / "out"
    first = OutputDirLock(out, wait_seconds=0)
    first.acquire()
    assert first.created_folder and first.created_file
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    waiter = subprocess.Popen(
        [sys.executable, "-c", WAITER, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert waiter.stdout.readline().strip() == "waiting"
        time.sleep(0.5)  # it has opened the file and waits on it
        first.release(remove=True)
        assert waiter.stdout.readline().split() == ["True", "True"]  # it created the path again
        third = OutputDirLock(out, wait_seconds=0)
        with pytest.raises(Exception, match="in use by another run"):
            third.acquire()
    finally:
        waiter.kill()
        waiter.wait()
