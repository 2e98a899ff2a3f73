"""``tuning launch``: job file → accelerate command, exit codes, ``.complete``.

The 2-process path (FSDP defaults applied, a killed rank → 203, the rerun → 0 and ``.complete``) runs in
tests/test_distributed.py; here the pieces in-process, and one real 1-process job failing on a user
error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, text_rows, write_json
from tuning import cli, launch
from tuning.errors import UserError


def test_job_file_splits_training_and_accelerate_args(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("output_dir: out\nlearning_rate: 1.0e-5\naccelerate_launch_args:\n  num-processes: 2\n")
    assert launch.read_job(str(job)) == ({"output_dir": "out", "learning_rate": 1e-5}, {"num_processes": 2})
    as_json = tmp_path / "job.json"
    as_json.write_text(json.dumps({"output_dir": "out"}))
    assert launch.read_job(str(as_json)) == ({"output_dir": "out"}, {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "must hold a mapping"),
        ("accelerate_launch_args: [1]\n", "accelerate_launch_args in"),
        ("x: !!python/object/apply:os.system ['true']\n", "is not valid"),  # no code, no pickle: safe_load
        ("a: [\n", "is not valid"),
    ],
)
def test_bad_job_files_are_user_errors(tmp_path, text, message):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    with pytest.raises(UserError, match=message):
        launch.read_job(str(job))


def test_num_processes_defaults_to_visible_gpus_and_fsdp_applies_above_one():
    assert launch.resolve_launch_args({}, gpus=0) == {"num_processes": 1}
    assert launch.resolve_launch_args({}, gpus=1) == {"num_processes": 1}
    eight = launch.resolve_launch_args({"main_process_port": 1234}, gpus=8)
    assert eight == {"main_process_port": 1234, "num_processes": 8, "config_file": str(launch.FSDP_DEFAULTS)}
    two_nodes = launch.resolve_launch_args({"num_machines": 2, "machine_rank": 1}, gpus=8)
    assert two_nodes["num_processes"] == 16 and two_nodes["config_file"] == str(launch.FSDP_DEFAULTS)
    # a mode of the user's own wins: no FSDP defaults on top of it
    assert "config_file" not in launch.resolve_launch_args({"multi_gpu": True}, gpus=4)
    assert launch.resolve_launch_args({"config_file": "ds.yaml"}, gpus=4)["config_file"] == "ds.yaml"


def test_accelerate_flags():
    flags = launch.accelerate_flags({"num_processes": 2, "use_fsdp": True, "cpu": False, "gpu_ids": [0, 1]})
    assert flags == ["--num_processes=2", "--use_fsdp", "--gpu_ids=0,1"]
    with pytest.raises(UserError, match="did you mean --num_processes"):
        launch.accelerate_flags({"num_process": 2})


@pytest.mark.parametrize(
    ("returncode", "reasons", "signum", "expected"),
    [
        (0, [], None, 0),
        (1, ["error: --learning_rate must be positive"], None, 1),
        (1, ["error: bad flag", "error: bad flag"], None, 1),  # every rank says the same
        (1, ["internal error: RuntimeError: boom"], None, 203),
        (1, ["error: x", "out of memory: OutOfMemoryError: CUDA"], None, 203),
        (1, [], None, 203),  # a rank died without a word (killed, segfault)
        (1, ["interrupted: stopped at step 4"], 15, 143),
        # not signalled here: another machine's launcher was, and every rank here stopped on it
        (1, ["interrupted: stopped by SIGTERM at step 4 after saving checkpoint-4; rerun"] * 2, None, 143),
        (1, ["interrupted: stopped by SIGINT at step 4 after saving checkpoint-4; rerun"], None, 130),
        (1, ["interrupted: stopped by SIGTERM at step 4", "internal error: RuntimeError: x"], None, 203),
    ],
)
def test_exit_codes(returncode, reasons, signum, expected):
    assert launch.exit_code_for(returncode, reasons, signum) == expected


def test_accelerate_flags_after_the_job_file_override_it(tmp_path):
    assert launch.parse_overrides(["--machine_rank", "1", "--num_machines=2", "--same_network"]) == {
        "machine_rank": "1",
        "num_machines": "2",
        "same_network": True,
    }
    assert launch.parse_overrides(["--main-process-ip", "10.0.0.1"]) == {"main_process_ip": "10.0.0.1"}
    with pytest.raises(UserError, match="expected an --accelerate_flag after the job file, got '1'"):
        launch.parse_overrides(["1"])
    # shipped configs by name, a real file as given
    assert launch.shipped_config("accelerate_fsdp_defaults.yaml") == str(launch.FSDP_DEFAULTS)
    own = tmp_path / "accelerate_fsdp_defaults.yaml"
    own.write_text("distributed_type: FSDP\n")
    assert launch.shipped_config(str(own)) == str(own)
    assert launch.shipped_config("nowhere.yaml") == "nowhere.yaml"


def test_signals_go_to_the_ranks_not_to_the_elastic_agent(tmp_path):
    """A stand-in launcher with one child that traps SIGTERM: the child gets the signal, the launcher
    (which would start torch's 30 s kill timer) does not, and the wrapper reports 143."""
    script = (
        "import signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, sys, time; "
        'signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); open(sys.argv[1], "w").close(); '
        "time.sleep(60)', sys.argv[1]])\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(99))  # the agent: must not be signalled\n"
        "sys.exit(1 if child.wait() == 143 else 2)\n"
    )
    ready = tmp_path / "ready"
    import threading

    def signal_when_ready():
        while not ready.exists():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_ready, daemon=True).start()
    returncode, signum = launch._run_forwarding_signals(
        [sys.executable, "-c", script, str(ready)], dict(os.environ)
    )
    assert (returncode, signum) == (
        1,
        signal.SIGTERM,
    )  # the child exited 143, the launcher 1: like accelerate
    assert launch.exit_code_for(returncode, [], signum) == 143


def test_usage_and_missing_job_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(launch.JOB_PATH_ENV, raising=False)
    monkeypatch.setenv("TERMINATION_LOG_FILE", str(tmp_path / "termination.log"))
    assert launch.main([]) == 1
    assert launch.main([str(tmp_path / "missing.yaml")]) == 1
    assert "job file" in capsys.readouterr().err
    assert (tmp_path / "termination.log").read_text().count("error: ") == 2
    assert cli.main(["launch", str(tmp_path / "missing.yaml")]) == 1  # `tuning launch` is launch.main


def _job(tmp_path, tiny_model_dir, **training) -> str:
    tmp_path.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = {
        "model_name_or_path": str(tiny_model_dir),
        "training_data_path": str(write_json(tmp_path / "data.json", text_rows(1))),
        "output_dir": str(tmp_path / "out"),
        "dataset_text_field": "output",
        "torch_dtype": "float32",
        "max_steps": 1,
        "save_strategy": "no",
        "accelerate_launch_args": {"num_processes": 1, "main_process_port": port},
        **training,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def _launch(job: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TERMINATION_LOG_FILE"}
    cmd = [sys.executable, "-m", "tuning.cli", "launch", job]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.slow
def test_user_error_in_a_rank_exits_1_with_its_line_in_the_termination_log(tmp_path, tiny_model_dir):
    """(Success, ``.complete`` and 203 for a killed rank: tests/test_distributed.py, 2 processes.)"""
    job = _job(tmp_path / "bad", tiny_model_dir, learning_rat=1e-5)
    out = tmp_path / "bad" / "out"
    out.mkdir()  # error.log goes only into a folder that exists (tuning/errors.py)
    result = _launch(job)
    assert result.returncode == 1, result.stderr[-2000:]
    assert not (out / launch.COMPLETE_MARKER).exists()
    # the trainer's one line reached the usual termination log, through the launcher
    assert "unknown key 'learning_rat'" in (out / "error.log").read_text()
