"""Every command ends through one path (``tuning.errors.run_command``): 0 done, 1 a user mistake (one
line, no traceback), 203 an internal failure (with the traceback), 130/143 stopped by SIGINT/SIGTERM;
the line also goes to the termination log, clipped to one short line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, text_rows, write_json
from tuning import cli, launch, merge, plot, preview, sft_trainer
from tuning.errors import (
    INTERNAL_ERROR_EXIT_CODE,
    MAX_LINE_CHARS,
    SIGINT_EXIT_CODE,
    SIGTERM_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    clip,
)


@pytest.fixture
def train_argv(tmp_path, tiny_model_dir):
    data = write_json(tmp_path / "data.json", text_rows(1))
    return [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--training_data_path",
        str(data),
        "--dataset_text_field",
        "output",
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "1",
        "--torch_dtype",
        "float32",
    ]


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv("TERMINATION_LOG_FILE", str(log))
    return log


def _raise(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


def _sigterm_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises before this returns
    raise AssertionError("SIGTERM did not interrupt the command")


# command → (main, a command line that fails as a user mistake, the function to break for the other cases)
def commands(tmp_path, train_argv):
    return {
        "train": (sft_trainer.main, [*train_argv, "--max_seq_length", "0"], (sft_trainer, "run")),
        "preview": (preview.main, [*train_argv, "--preview", "-1"], (preview, "preview_parts")),
        "merge": (
            merge.main,
            ["--adapter", str(tmp_path / "none"), "--output", str(tmp_path / "m")],
            (merge, "merge"),
        ),
        "launch": (launch.main, [str(tmp_path / "no-job.yaml")], (launch, "run_job")),
        "plot": (plot.main, [str(tmp_path)], (plot, "render_loss_plot")),
    }


def _ok_args(name, tmp_path, train_argv):
    """Arguments that reach the function we break."""
    job = tmp_path / "job.yaml"
    job.write_text("output_dir: x\n")
    return {
        "train": train_argv,
        "preview": train_argv,
        "merge": ["--adapter", "a", "--output", str(tmp_path / "m")],
        "launch": [str(job)],
        "plot": [str(tmp_path)],
    }[name]


NAMES = ["train", "preview", "merge", "launch", "plot"]


def _last_line(capsys) -> tuple[str, str]:
    err = capsys.readouterr().err
    return err.strip().splitlines()[-1], err


@pytest.mark.parametrize("name", NAMES)
def test_user_mistake_exits_1_with_one_line_and_no_traceback(
    name, tmp_path, train_argv, termination_log, capsys
):
    main, bad, _ = commands(tmp_path, train_argv)[name]
    assert main(bad) == USER_ERROR_EXIT_CODE
    line, err = _last_line(capsys)
    assert line.startswith("error: ") and "Traceback" not in err
    assert termination_log.read_text().splitlines() == [line]


@pytest.mark.parametrize("name", NAMES)
def test_internal_failure_exits_203_with_the_traceback(
    name, tmp_path, train_argv, termination_log, capsys, monkeypatch
):
    main, _, (module, attr) = commands(tmp_path, train_argv)[name]
    monkeypatch.setattr(module, attr, _raise(RuntimeError("a bug of ours\nsecond line")))
    assert main(_ok_args(name, tmp_path, train_argv)) == INTERNAL_ERROR_EXIT_CODE
    line, err = _last_line(capsys)
    assert line == "internal error: RuntimeError: a bug of ours"
    assert "Traceback" in err
    assert termination_log.read_text().splitlines() == [line]


@pytest.mark.parametrize("name", NAMES)
def test_ctrl_c_exits_130_without_a_traceback(
    name, tmp_path, train_argv, termination_log, capsys, monkeypatch
):
    main, _, (module, attr) = commands(tmp_path, train_argv)[name]
    monkeypatch.setattr(module, attr, _raise(KeyboardInterrupt()))
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert main(_ok_args(name, tmp_path, train_argv)) == SIGINT_EXIT_CODE
    finally:
        signal.signal(signal.SIGINT, previous)
    line, err = _last_line(capsys)
    assert line.startswith("interrupted: stopped by SIGINT") and "Traceback" not in err
    assert termination_log.read_text().splitlines() == [line]


@pytest.mark.parametrize("name", NAMES)
def test_sigterm_outside_training_exits_143_with_its_line(
    name, tmp_path, train_argv, termination_log, capsys, monkeypatch
):
    main, _, (module, attr) = commands(tmp_path, train_argv)[name]
    monkeypatch.setattr(module, attr, _sigterm_self)
    assert main(_ok_args(name, tmp_path, train_argv)) == SIGTERM_EXIT_CODE
    line, err = _last_line(capsys)
    assert line.startswith("interrupted: stopped by SIGTERM") and "Traceback" not in err
    assert termination_log.read_text().splitlines() == [line]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler is gone again


def test_tuning_command_routes_and_refuses_unknown_commands(capsys, termination_log):
    assert cli.main(["--help"]) == 0
    assert cli.main(["trian"]) == USER_ERROR_EXIT_CODE
    line, _ = _last_line(capsys)
    assert line.startswith("error: unknown command 'trian' (did you mean 'train'?)")
    assert cli.main([]) == USER_ERROR_EXIT_CODE
    assert cli.main(["plot", "--no-such-flag"]) == USER_ERROR_EXIT_CODE  # argparse would exit 2


def test_a_huge_value_is_clipped_keeping_what_failed_and_the_fix(train_argv, termination_log, capsys):
    huge = "x" * 100_000
    assert sft_trainer.main([*train_argv, "--response_template", huge]) == USER_ERROR_EXIT_CODE
    line, _ = _last_line(capsys)
    assert len(line) <= MAX_LINE_CHARS
    assert line.startswith("error: --response_template") and line.endswith(
        "pass a marker that occurs in the text"
    )
    assert clip("a\nb  c") == "a b c"


def test_termination_log_finds_output_dir_by_prefix_or_in_the_config_file(
    tmp_path, train_argv, monkeypatch, capsys
):
    monkeypatch.delenv("TERMINATION_LOG_FILE", raising=False)
    argv = [a for a in train_argv if a not in ("--output_dir", str(tmp_path / "out"))]
    (tmp_path / "abbrev").mkdir()  # error.log goes only into a folder that exists (tuning/errors.py)
    (tmp_path / "from-file").mkdir()
    assert sft_trainer.main([*argv, "--output_d", str(tmp_path / "abbrev"), "--lora_r", "x"]) == 1
    assert "lora_r" in (tmp_path / "abbrev" / "error.log").read_text()
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "from-file"), "max_seq_length": 0}))
    assert sft_trainer.main([*argv, "--config", str(config)]) == 1
    assert "max_seq_length" in (tmp_path / "from-file" / "error.log").read_text()


def test_debug_traceback_follows_the_parsed_log_level(train_argv, capsys, termination_log):
    bad = ["--response_template", "never there"]
    # a value that happens to read "debug" must not switch debug on (the old argv scan did)
    assert sft_trainer.main([*train_argv, *bad, "--log_level_replica", "debug"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert sft_trainer.main([*train_argv, *bad, "--log_level", "debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_twice_while_preparing_data_prints_no_traceback(tmp_path, train_argv):
    """A user pressing Ctrl-C twice during start-up (a real process, real signals)."""
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may ignore it)\n"
        "from tuning import sft_trainer\n"
        "def slow(*a, **k):\n"
        "    print('preparing', flush=True); time.sleep(60)\n"
        "sft_trainer.build_datasets = slow\n"
        "sys.exit(sft_trainer.main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERMINATION_LOG_FILE": str(tmp_path / "log")}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *train_argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "preparing"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == SIGINT_EXIT_CODE, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "interrupted: stopped by SIGINT"
    )
    assert (tmp_path / "log").read_text().startswith("interrupted: stopped by SIGINT")
