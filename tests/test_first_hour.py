"""A new user's first hour: errors that say what is wrong (a missing folder is not a network problem),
``--help`` that answers at once and shows a command's own options first, a helper script that never
turns ``--help`` into a folder, and ``tuning tiny-model``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, io_rows, run_cli, write_json
from tuning import cli, plan, preview, sft_trainer, tiny
from tuning.config import ModelArgs
from tuning.errors import UserError
from tuning.model.loading import load_model_config
from tuning.model.sources import could_be_hub_id

REAL = REPO.parent / "shared" / "real-tokenizers"


def _last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "name",
    ["./tiny-lama", "../models/tiny-lama", "/data/models/tiny-lama", "~/tiny-lama", "a/b/c", "tiny--lama"],
)
def test_a_missing_local_path_is_named_as_one(name, tmp_path, capsys):
    assert not could_be_hub_id(name)
    argv = [
        "--model_name_or_path",
        name,
        "--training_data_path",
        str(write_json(tmp_path / "d.json", io_rows(1))),
    ]
    argv += ["--output_dir", str(tmp_path / "out")]
    assert sft_trainer.main(argv) == 1
    assert _last_error(capsys) == f"error: --model_name_or_path {name}: no such folder; check the path"


@pytest.mark.parametrize("name", ["tiny-lama", "my-org/tiny-lama", "gpt2"])
def test_a_hub_id_that_cannot_be_reached_says_so(name, tmp_path, capsys, monkeypatch):
    assert could_be_hub_id(name)
    monkeypatch.chdir(tmp_path)  # no such folder here; HF_HUB_OFFLINE=1 (tests/conftest.py)
    with pytest.raises(UserError) as raised:
        load_model_config(ModelArgs(model_name_or_path=name))
    assert str(raised.value) == (
        f"--model_name_or_path {name}: no such local folder, and not a Hub id that can be loaded: the Hub "
        "cannot be reached from here (offline); check the spelling, or pass a local folder"
    )
    assert plan.main(["--model_name_or_path", name]) == 1
    assert _last_error(capsys) == f"error: {raised.value}"


def test_a_folder_without_tokenizer_files_says_which_flag_fixes_it(tmp_path, capsys):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    argv = [
        "--model_name_or_path",
        str(folder),
        "--training_data_path",
        str(write_json(tmp_path / "d.json", io_rows(1))),
    ]
    argv += ["--output_dir", str(tmp_path / "out")]
    assert sft_trainer.main(argv) == 1
    line = _last_error(capsys)
    assert line.startswith(f"error: cannot load a tokenizer from {folder} (--model_name_or_path): ")
    assert line.endswith("pass a folder with tokenizer files or a Hub id via --tokenizer_name_or_path")


@pytest.mark.parametrize(("command", "own"), [(preview, "--preview N"), (plan, "--device_memory GPU")])
def test_a_commands_help_shows_its_own_options_first(command, own, capsys):
    with pytest.raises(SystemExit) as done:
        command.main(["--help"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"usage: tuning {command.__name__.split('.')[-1]} ") and len(lines[0]) < 120
    assert lines[2].endswith("options:") and lines[3].lstrip().startswith(own)
    assert lines.index("training flags (those of tuning train):") < 15


@pytest.mark.slow
@pytest.mark.parametrize("script", ["tiny_model", "tiny_gpt_oss", "tiny_qwen3"])
def test_a_testing_script_answers_help_without_writing_a_folder(script, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", f"tuning.testing.{script}", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and done.stdout.startswith(f"usage: python -m tuning.testing.{script} ")
    assert list(tmp_path.iterdir()) == []
    wrong = subprocess.run(
        [sys.executable, "-m", f"tuning.testing.{script}", "--out", "x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: usage:")
    assert list(tmp_path.iterdir()) == []


def test_tuning_help_and_a_mistyped_command_import_no_command(capsys):
    code = (
        "import sys; from tuning import cli; cli.main(['--help']); cli.main(['trian']);"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'tuning')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert "unknown command 'trian' (did you mean 'train'?)" in done.stderr
    assert json.loads(done.stdout.splitlines()[-1].replace("'", '"')) == [
        "tuning",
        "tuning.cli",
        "tuning.errors",
        "tuning.logs",
    ]


def test_tiny_model_command_builds_a_family_from_its_config(tmp_path, capsys):
    if not (REAL / "mistral-v0.3" / "config.json").is_file():
        pytest.skip(f"real mistral-v0.3 config not found under {REAL}")
    assert cli.main(["tiny-model", "--config", str(REAL / "mistral-v0.3"), "--out", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tmp_path / "m")
    real = AutoConfig.from_pretrained(REAL / "mistral-v0.3")
    assert (config.model_type, config.vocab_size, config.tie_word_embeddings) == ("mistral", 32768, False)
    assert (config.hidden_size, config.num_hidden_layers) == (32, 2)
    assert config.eos_token_id == real.eos_token_id
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "m").chat_template
        == AutoTokenizer.from_pretrained(REAL / "mistral-v0.3").chat_template
    )


def test_tiny_model_command_refuses_what_is_not_a_config(tmp_path, capsys):
    assert tiny.main(["--config", str(tmp_path), "--out", str(tmp_path / "m")]) == 1
    assert _last_error(capsys) == (
        f"error: --config {tmp_path}: no config.json there; pass a model folder or its config.json"
    )
    assert tiny.main(["--out", "m"]) == 1
    assert "the following arguments are required: --config" in _last_error(capsys)
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")]
)
def test_a_stop_signal_during_the_imports_ends_with_one_line(signum, code, name, tmp_path):
    """SIGTERM or Ctrl-C while `python -m tuning.sft_trainer` is still importing torch and transformers."""
    program = (
        "import signal, runpy\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may ignore it)\n"
        "runpy.run_module('tuning.sft_trainer', run_name='__main__', alter_sys=True)\n"
    )
    argv = ["--model_name_or_path", str(tmp_path / "m"), "--training_data_path", str(tmp_path / "d.json")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERMINATION_LOG_FILE": str(tmp_path / "log")}
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-c", program, *argv, "--output_dir", str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    for line in proc.stderr:  # each import's line comes as it finishes: torch done, transformers under way
        if line.rsplit("|", 1)[-1].strip() == "torch":
            proc.send_signal(signum)
            break
    err = proc.stderr.read()
    proc.wait(timeout=120)
    ours = [x for x in err.splitlines() if not x.startswith("import time:")]
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and len(ours) == 1, ours
    assert ours[0].startswith(f"interrupted: stopped by {name} outside a training step")
    assert (tmp_path / "log").read_text() == ours[0] + "\n"
    assert not (tmp_path / "out").exists()


OUR_LINE = re.compile(r"^\d\d:\d\d:\d\d INFO tuning[\w.]*: |^  \S")  # ours, and the memory plan's rows


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [[], ["--peft_method", "lora", "--gradient_checkpointing", "True"]], ids=["full", "lora"]
)
def test_a_default_cpu_run_logs_only_our_lines(extra, tiny_model_dir, tmp_path):
    """Nothing but our own lines in a run that went right: no library warnings (DeepSpeed, bitsandbytes,
    transformers' deprecations), no fallback warning for a kernel nobody asked for, no per-epoch
    deletions, a rounded final loss."""
    # distinct rows: the data audit rightly warns about duplicates, and this run must have nothing to say
    data = write_json(
        tmp_path / "d.json", [{**r, "input": f"{r['input']} ({n})"} for n, r in enumerate(io_rows(2))]
    )
    out = tmp_path / "out"
    args = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--training_data_path",
        str(data),
        "--output_dir",
        str(out),
    ]
    args += [
        "--num_train_epochs",
        "3",
        "--save_total_limit",
        "1",
        "--save_model_dir",
        str(out / "final"),
        *extra,
    ]
    done = run_cli(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""
    foreign = [line for line in done.stderr.splitlines() if not OUR_LINE.match(line)]
    assert foreign == []
    assert "deleting checkpoint" not in done.stderr and "parameters: none" not in done.stderr
    assert re.search(r"final loss \d+\.\d{4}, peak memory", done.stderr.splitlines()[-1])


@pytest.mark.slow
def test_an_adapter_trained_from_a_relative_path_merges_from_anywhere(tiny_model_dir, tmp_path, monkeypatch):
    """The adapter records its local base as an absolute path (a Hub id as given), so `tuning merge`
    works from another folder."""
    import shutil

    from tuning.model.sources import model_source

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copytree(tiny_model_dir, work / "tiny-llama")
    monkeypatch.chdir(work)
    write_json(work / "d.json", io_rows(1))
    argv = ["--model_name_or_path", "tiny-llama", "--training_data_path", "d.json", "--output_dir", "out"]
    argv += [
        "--peft_method",
        "lora",
        "--max_steps",
        "1",
        "--save_strategy",
        "no",
        "--save_model_dir",
        "out/final",
    ]
    assert sft_trainer.main(argv) == 0
    config = json.loads((work / "out" / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(work / "tiny-llama")
    monkeypatch.chdir(elsewhere)
    assert cli.main(["merge", "--adapter", str(work / "out" / "final"), "--output", "merged"]) == 0
    assert (elsewhere / "merged" / "config.json").is_file()
    assert model_source("my-org/some-model") == "my-org/some-model"  # a Hub id is kept as given
