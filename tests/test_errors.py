"""Every user mistake exits 1 with one line (what, where, how to fix), also in the termination log;
internal failures exit 203. Run in-process through ``main(argv)`` except where the process matters."""

from __future__ import annotations

import re

import pytest

from tests.conftest import io_rows, run_cli, text_rows, write_json, write_jsonl
from tuning import sft_trainer
from tuning.errors import INTERNAL_ERROR_EXIT_CODE, USER_ERROR_EXIT_CODE


@pytest.fixture
def job(tmp_path, tiny_model_dir):
    """A valid command line, as a dict, that each case breaks in one way."""
    data = write_json(tmp_path / "data.json", text_rows(1))
    return {
        "--model_name_or_path": str(tiny_model_dir),
        "--training_data_path": str(data),
        "--output_dir": str(tmp_path / "out"),
        "--dataset_text_field": "output",
        "--response_template": "\\n### Label:",
        "--max_steps": "1",
        "--torch_dtype": "float32",
    }


def argv_of(job: dict) -> list[str]:
    return [x for kv in job.items() for x in kv if x is not None]


def run_failing(job, tmp_path, monkeypatch, capsys, code=USER_ERROR_EXIT_CODE) -> str:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("TERMINATION_LOG_FILE", str(log))
    assert sft_trainer.main(argv_of(job)) == code
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err_lines) or code == INTERNAL_ERROR_EXIT_CODE
    assert log.read_text().splitlines() == [err_lines[-1]]
    return err_lines[-1]


def _bad_file(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


CASES = {
    "missing data file": (
        lambda t: {"--training_data_path": str(t / "nope.json")},
        r"nope.json does not exist",
    ),
    "empty data file": (lambda t: {"--training_data_path": _bad_file(t, "e.json", b"")}, r"e.json is empty"),
    "malformed data": (
        lambda t: {"--training_data_path": _bad_file(t, "m.jsonl", b'{"output": "a"}\n{"output": }\n')},
        r"m.jsonl is malformed: line 2",
    ),
    "non-UTF-8 data": (
        lambda t: {"--training_data_path": _bad_file(t, "l.jsonl", b'{"output": "\xff"}\n')},
        r"l.jsonl is not UTF-8 text \(byte 12, line 1\)",
    ),
    "missing column": (
        lambda t: {"--dataset_text_field": "text"},
        r"column 'text' \(needed for text data\) is not in the data; columns: \['output'\]",
    ),
    "template never found": (
        lambda t: {"--response_template": "\\n### Response:"},
        r"--response_template '\\n### Response:' was not found in any of 8 rows; first row renders as '### Text",
    ),
    "formatter column missing": (
        lambda t: {
            "--dataset_text_field": None,
            "--data_formatter_template": "{{input}} ## Label: {{outptu}}",
        },
        r"refers to a missing column .*available columns: \['output'\]",
    ),
    "bad model path": (
        lambda t: {"--model_name_or_path": str(t / "no-model")},
        r"--model_name_or_path .*no-model: no such folder; check the path",
    ),
    "bad dtype": (lambda t: {"--torch_dtype": "float8"}, r"invalid choice: 'float8'"),
    "unknown flag": (
        lambda t: {"--learnin_rate": "1"},
        r"unknown flag --learnin_rate \(did you mean --learning_rate\?\)",
    ),
    "zero epochs": (lambda t: {"--max_steps": None, "--num_train_epochs": "0"}, r"nothing would be trained"),
    "output_dir is a file": (lambda t: {"--output_dir": _bad_file(t, "f", b"x")}, r"is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistakes_exit_1_with_one_line(case, job, tmp_path, monkeypatch, capsys):
    change, message = CASES[case]
    for key, value in change(tmp_path).items():
        if value is None:
            job.pop(key, None)
        else:
            job[key] = value
    line = run_failing(job, tmp_path, monkeypatch, capsys)
    assert line.startswith("error: ")
    assert re.search(message, line), f"{message!r} not in {line!r}"


def test_error_log_in_output_dir_without_termination_log_env(job, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TERMINATION_LOG_FILE", raising=False)
    job["--response_template"] = "never there"
    (tmp_path / "out").mkdir()  # error.log goes only into a folder that exists (tuning/errors.py)
    assert sft_trainer.main(argv_of(job)) == USER_ERROR_EXIT_CODE
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (tmp_path / "out" / "error.log").read_text().splitlines() == [line]


def test_internal_failure_exits_203(job, tmp_path, monkeypatch, capsys):
    def boom(config):
        raise RuntimeError("something we did wrong")

    monkeypatch.setattr(sft_trainer, "run", boom)
    line = run_failing(job, tmp_path, monkeypatch, capsys, code=INTERNAL_ERROR_EXIT_CODE)
    assert line == "internal error: RuntimeError: something we did wrong"


def test_out_of_memory_exits_203(job, tmp_path, monkeypatch, capsys):
    def oom(config):
        raise __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sft_trainer, "run", oom)
    line = run_failing(job, tmp_path, monkeypatch, capsys, code=INTERNAL_ERROR_EXIT_CODE)
    assert line.startswith("out of memory: OutOfMemoryError: CUDA out of memory")


@pytest.mark.slow
def test_subprocess_user_error_has_no_traceback_and_keeps_checkpoints(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "d.jsonl", io_rows(1))
    ok = run_cli(
        [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--training_data_path",
            str(data),
            "--output_dir",
            str(out),
            "--num_train_epochs",
            "1",
            "--torch_dtype",
            "float32",
        ]
    )
    assert ok.returncode == 0, ok.stderr
    before = {p: p.read_bytes() for p in out.glob("checkpoint-*/*") if p.is_file()}
    assert before
    bad = run_cli(
        [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--training_data_path",
            str(tmp_path / "x.json"),
            "--output_dir",
            str(out),
        ]
    )
    assert bad.returncode == USER_ERROR_EXIT_CODE
    assert "Traceback" not in bad.stderr and bad.stderr.strip().splitlines()[-1].startswith(
        "error: data file"
    )
    assert {p: p.read_bytes() for p in out.glob("checkpoint-*/*") if p.is_file()} == before
