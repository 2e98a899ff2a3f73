"""One writer per output_dir: the lock is held by a real other process, dies with it, and a second run
waits a bounded time, then exits 1 naming the holder. The full replacement-pod case (a run still saving
after SIGTERM while the next one starts) is in tests/test_resume.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tuning import lock
from tuning.errors import UserError
from tuning.lock import LOCK_NAME, output_dir_lock
from tuning.sft_trainer import main

HOLDER = """
import sys, time
from tuning.lock import output_dir_lock
with output_dir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(output_dir, seconds: float) -> subprocess.Popen:
    """Another process holding the lock on ``output_dir`` for ``seconds`` (returns once it holds it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output_dir), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_dies_with_it(tmp_path):
    holder = hold(tmp_path, 60)
    try:
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        with pytest.raises(UserError) as e, output_dir_lock(tmp_path, wait_seconds=0.2):
            pass
        assert str(e.value).startswith(
            f"--output_dir {tmp_path} is in use by another run (pid {holder.pid} on {socket.gethostname()} "
            f"since {info['since']}); waited 0 s. Stop that run or wait for it to end"
        )
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel releases the lock
        holder.wait()
    with output_dir_lock(tmp_path, wait_seconds=0):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_second_run_waits_for_the_holder_to_end(tmp_path, caplog):
    holder = hold(tmp_path, 0.5)
    start = time.monotonic()
    with (
        caplog.at_level(logging.INFO, logger="tuning"),
        output_dir_lock(tmp_path, wait_seconds=30, poll_seconds=0.05),
    ):
        waited = time.monotonic() - start
    holder.wait()
    assert 0 < waited < 30
    assert (
        f"is in use by another run (pid {holder.pid} on" in caplog.text
        and "waiting up to 30 s" in caplog.text
    )
    assert "is free now" in caplog.text


def test_the_cli_exits_1_with_the_holder_in_the_message_and_the_termination_log(tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold(out, 60)
    try:
        data = tmp_path / "d.json"  # exists: a missing data file is reported before the lock is taken
        data.write_text("[]")
        argv = ["--model_name_or_path", "m", "--training_data_path", str(data), "--output_dir", str(out)]
        assert main([*argv, "--wait_for_output_dir", "0"]) == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    line = f"error: --output_dir {out} is in use by another run (pid {holder.pid} on {socket.gethostname()}"
    assert line in capsys.readouterr().err
    assert line in (out / "error.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "error.log"]  # nothing else touched


def test_a_filesystem_without_locks_runs_unprotected_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING), output_dir_lock(tmp_path):
        pass
    assert "this filesystem has no file locks" in caplog.text


def test_ranks_that_write_nothing_take_no_lock(tmp_path):
    with output_dir_lock(tmp_path / "out", enabled=False):
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_negative_or_nan_wait_is_a_user_error(tmp_path, capsys, value):
    argv = [
        "--model_name_or_path",
        "m",
        "--training_data_path",
        "d.json",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    assert main([*argv, "--wait_for_output_dir", value]) == 1
    assert (
        f"--wait_for_output_dir is {value} (command line): it must be a finite number >= 0"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "out" / LOCK_NAME).exists()
