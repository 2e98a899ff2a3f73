"""Refusals are user errors, not crashes: sandboxed Jinja escapes on every template surface, pickles
torch's weights-only loader refuses, folders a run can't write, dangling links, damaged binary data,
a full disk while saving. And no error line quotes more than a short excerpt of a data row."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import io_rows, write_jsonl
from tuning import sft_trainer
from tuning.config import parse_config
from tuning.data import chat
from tuning.data.formats import RowTemplate
from tuning.data.handlers.chat import tokenize_and_apply_chat_template_with_masking as chat_masking
from tuning.data.handlers.templates import apply_custom_jinja_template, apply_tokenizer_chat_template
from tuning.data.loading import load_data
from tuning.data.sandbox import template_errors, template_failure
from tuning.errors import EXCERPT_CHARS, USER_ERROR_EXIT_CODE, UserError, environment_error, excerpt
from tuning.files import check_writable_folder, is_disk_full, refused_pickle

MARK = "/tmp/tuning-sandbox-escaped"  # an escape that ran would create this file
ESCAPES = {
    "__mro__": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "__globals__": "{{ cycler.__init__.__globals__.os.system('touch " + MARK + "') }}",
    "self globals": "{{ self.__init__.__globals__.__builtins__.open('" + MARK + "', 'w') }}",
    "attr filter": "{{ (''|attr('__class__')).__base__ }}",
    "format": "{{ '{0.__class__.__base__}'.format(1) }}",
    "include": "{% include '/etc/passwd' %}",
    "import": "{% import '/etc/passwd' as p %}",
    "from import": "{% from '/etc/passwd' import x %}",
    "extends": "{% extends '/etc/passwd' %}",
    "huge range": "{% for i in range(10**9) %}{% endfor %}",
}
# only our own row templates bound * and ** (chat templates compile in transformers' environment)
ROW_ONLY = {"huge repetition": "{{ 'a' * 10**10 }}", "huge power": "{{ 7 ** 100000000 }}"}
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def chat_samples(messages: list, tokenizer, template: str) -> list:
    """The chat rule's samples of one conversation (tuning.data.chat: contexts and completions)."""
    conversation = chat.Conversation(chat.normalize_messages(messages, "messages"))
    return chat.conversation_samples(
        conversation, chat.ChatTemplate(tokenizer, template), chat.ChatSettings(()), ()
    )


def surfaces(tokenizer):
    """Every place a template given by a user or a model is compiled and rendered."""
    return {
        "--data_formatter_template": lambda t: RowTemplate(t).render({"input": "a"}),
        "handler template": lambda t: apply_custom_jinja_template(
            {"input": ["a"]}, tokenizer=tokenizer, template=t
        ),
        "chat, by prefixes": lambda t: chat_samples(MESSAGES, tokenizer, t),
        "chat, {% generation %}": lambda t: chat_samples(
            MESSAGES, tokenizer, t + "{% generation %}{{ messages[-1].content }}{% endgeneration %}"
        ),
        "render-only handler": lambda t: apply_tokenizer_chat_template(
            {"messages": [MESSAGES]},
            tokenizer=tokenizer,
            chat_template=t,
            chat_settings=chat.ChatSettings(()),
            conversation_column_name="messages",
        ),
        "render-only handler, whole row": lambda t: apply_tokenizer_chat_template(
            {"messages": [MESSAGES]},
            tokenizer=tokenizer,
            chat_template=t,
            chat_settings=chat.ChatSettings(()),
        ),
        "masking handler": lambda t: chat_masking(
            {"messages": [MESSAGES]},
            tokenizer=tokenizer,
            chat_template=t,
            chat_settings=chat.ChatSettings(()),
        ),
    }


@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_every_sandbox_escape_on_every_surface_is_a_refusal(escape, tokenizer):
    Path(MARK).unlink(missing_ok=True)
    for surface, render in surfaces(tokenizer).items():
        with pytest.raises(UserError) as info:
            render(ESCAPES[escape])
        message = str(info.value)
        assert message.startswith("refused: "), (surface, message)
        assert "no code ran" in message or "nothing was read" in message or "sandbox" in message, message
        assert "\n" not in message and len(message) < 400
        assert not Path(MARK).exists(), f"{escape} ran code through {surface}"


@pytest.mark.parametrize("escape", sorted(ROW_ONLY))
def test_runaway_sizes_are_refused_in_row_templates(escape, tokenizer):
    for surface in ("--data_formatter_template", "handler template"):
        with pytest.raises(UserError, match=r"^refused: .* is too big\)"):
            surfaces(tokenizer)[surface](ROW_ONLY[escape])
    assert RowTemplate("{{ '-' * 3 }}{{ 2 ** 10 }}").render({}) == "---1024"  # small ones still work


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ x ", r"is not valid Jinja: unexpected end of template.* \(line 1\); fix the template"),
        (
            "{{ 1 / 0 }}",
            r"failed on row .*: ZeroDivisionError: 'division by zero'; fix the template or the data",
        ),
        ("{{ raise_exception('only user and assistant turns') }}", r"refused the data on row .*only user"),
        ("{{ messages[0].nope.deeper }}", r"uses an undefined value"),
    ],
)
def test_a_template_failing_on_data_is_a_user_error(template, message, tokenizer):
    for surface in ("chat, by prefixes", "masking handler", "render-only handler"):
        with pytest.raises(UserError, match=message):
            surfaces(tokenizer)[surface](template)


def test_failures_outside_a_template_stay_internal():
    assert template_failure(ValueError("ours"), "the chat template") is None
    with pytest.raises(KeyError), template_errors("the chat template"):
        raise KeyError("a bug of ours, not the template's")


def one_step(model: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", str(model), "--output_dir", str(out), "--max_steps", "1"]


def test_escapes_through_the_command_line_exit_1_with_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("TERMINATION_LOG_FILE", str(tmp_path / "log"))
    data = write_jsonl(tmp_path / "d.jsonl", io_rows(1))
    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES}] * 2)
    common = one_step(tiny_model_dir, tmp_path / "o")
    runs = [
        ["--training_data_path", str(data), "--data_formatter_template", ESCAPES["__globals__"]],
        ["--training_data_path", str(chats), "--chat_template", ESCAPES["include"]],
    ]
    for extra in runs:
        assert sft_trainer.main([*common, *extra]) == USER_ERROR_EXIT_CODE
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error: refused: ")
    assert not Path(MARK).exists()


# --- pickles torch's weights-only loader refuses -----------------------------------------------------


class Hostile:
    def __reduce__(self):
        return (os.getpid, ())  # harmless if it ever ran; the loader must refuse it unrun


def hostile_pickle(path: Path) -> Path:
    torch.save({"weight": torch.zeros(2), "payload": Hostile()}, path)
    return path


def test_refused_pickle_names_the_file_and_the_global(tmp_path):
    path = hostile_pickle(tmp_path / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError) as info:
        torch.load(path, weights_only=True)
    error = refused_pickle(info.value, "checkpoint x")
    assert error is not None
    assert str(error).startswith(f"refused to load {path} from checkpoint x: it holds Python objects")
    assert "getpid" in str(error) and "nothing ran" in str(error)
    assert refused_pickle(ValueError("Weights only load failed"), "x") is None


def test_a_pickle_only_model_with_hostile_objects_is_refused(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from tuning.config.args import DataArgs, ModelArgs
    from tuning.model import load_model, load_model_config, load_tokenizer, precision_plan

    folder = tmp_path / "model"
    folder.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.name != "model.safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    state = load_file(tiny_model_dir / "model.safetensors")
    torch.save({**state, "payload": Hostile()}, folder / "pytorch_model.bin")
    args = ModelArgs(model_name_or_path=str(folder), torch_dtype="float32")
    config = load_model_config(args)
    with pytest.raises(
        UserError, match=rf"^refused to load {re.escape(str(folder))}/pytorch_model.bin from model"
    ):
        load_model(args, precision_plan(args, config), load_tokenizer(args, DataArgs()), None, config)


@pytest.mark.slow
def test_a_checkpoint_with_a_hostile_pickle_is_refused_on_resume(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    monkeypatch.setenv("TERMINATION_LOG_FILE", str(tmp_path / "log"))
    data = write_jsonl(tmp_path / "d.jsonl", io_rows(1))
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(data), "--output_dir", str(out),
            "--torch_dtype", "float32", "--per_device_train_batch_size", "4", "--save_steps", "1"]  # fmt: skip
    assert sft_trainer.main([*argv, "--max_steps", "1"]) == 0
    checkpoint = out / "checkpoint-1"
    marker_path = checkpoint / "checkpoint_complete.json"
    committed = marker_path.read_text()
    for name in ("optimizer.pt", "rng_state.pth"):
        original = (checkpoint / name).read_bytes()
        state = torch.load(checkpoint / name, weights_only=False)
        state["payload"] = Hostile()
        torch.save(state, checkpoint / name)
        capsys.readouterr()
        if (checkpoint / name).stat().st_size != len(original):  # optimizer.pt here; torch pads zips
            # the marker lists every file's size: a file of another size than committed is found
            # before anything loads it
            assert sft_trainer.main([*argv, "--max_steps", "2"]) == USER_ERROR_EXIT_CODE
            line = capsys.readouterr().err.strip().splitlines()[-1]
            assert f"is damaged (checkpoint-1: {name} is " in line, line
        # the same size, or a marker that lists the hostile file (a crafted checkpoint): torch's loader
        # refuses it
        marker = json.loads(committed)
        marker["files"][name] = (checkpoint / name).stat().st_size
        marker_path.write_text(json.dumps(marker))
        assert sft_trainer.main([*argv, "--max_steps", "2"]) == USER_ERROR_EXIT_CODE
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"error: refused to load {checkpoint / name} from checkpoint {checkpoint}"), (
            line
        )
        assert "--resume_from_checkpoint" in line
        (checkpoint / name).write_bytes(original)
        marker_path.write_text(committed)


# --- folders a run can't write ----------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size, readonly=False)`` → a fresh tmpfs folder (root only; skipped where mount is refused)."""
    mounted: list[Path] = []

    def mount(size: str, readonly: bool = False) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(target)
        (target / "existing").mkdir()
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


BASE = ["--model_name_or_path", "m", "--training_data_path", "d.json"]


@pytest.mark.parametrize("flag", ["--output_dir", "--save_model_dir"])
def test_a_read_only_folder_is_refused_up_front(flag, tmpfs, tmp_path):
    ro = tmpfs("64k", readonly=True)
    other = ["--output_dir", str(tmp_path / "out")] if flag == "--save_model_dir" else []
    for path in (ro, ro / "existing", ro / "new" / "deeper"):
        with pytest.raises(
            UserError, match=rf"^{flag} {re.escape(str(path))} cannot be written: .* read-only"
        ):
            parse_config([*BASE, *other, flag, str(path)])


def test_over_long_names_and_paths_are_refused(tmp_path):
    long_name = tmp_path / ("n" * 300)
    with pytest.raises(UserError, match=r"^--output_dir: the folder name 'n{24}\.\.\.' is 300 bytes, longer"):
        check_writable_folder(long_name, "--output_dir")
    deep = tmp_path.joinpath(*["d" * 200] * 21)
    with pytest.raises(UserError, match=r"^--output_dir is \d+ bytes long: .* limit of \d+ bytes"):
        check_writable_folder(deep, "--output_dir")
    # short enough itself (60 bytes under the limit), not with checkpoint-N/... inside it
    target = 4096 - 60 - len(str(tmp_path))
    full, rest = divmod(target, 201)
    almost = tmp_path.joinpath(*["d" * 200] * full, "e" * max(rest - 1, 1))
    assert 4096 - 128 < len(str(almost)) < 4096
    with pytest.raises(UserError, match=r"bytes long"):
        check_writable_folder(almost, "--output_dir")


def test_dangling_links_and_files_in_the_way_are_refused(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    for path in (link, link / "sub"):
        with pytest.raises(
            UserError, match=rf"{re.escape(str(link))} is a symlink to .*gone, which does not exist"
        ):
            parse_config([*BASE, "--output_dir", str(path)])
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(UserError, match=r"is a file, not a folder"):
        parse_config([*BASE, "--output_dir", str(file / "sub")])
    check_writable_folder(tmp_path / "new" / "folders", "--output_dir")  # creatable: fine, nothing created
    assert not (tmp_path / "new").exists()


def test_environment_errors_name_the_path():
    assert str(environment_error(OSError(28, "No space left on device", "/x/y"))).startswith(
        "cannot access /x/y: No space left on device; free some space"
    )
    assert "writable filesystem" in str(environment_error(OSError(30, "Read-only file system", "/r")))
    assert environment_error(OSError(2, "No such file or directory", "/x")) is None
    assert environment_error(ValueError("x")) is None


# --- data files ---------------------------------------------------------------------------------------


def test_dangling_data_links_are_refused_wherever_they_appear(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", io_rows(1))
    (folder / "b.jsonl").symlink_to(tmp_path / "missing.jsonl")
    message = rf"data file {re.escape(str(folder / 'b.jsonl'))} is a symlink to .*missing.jsonl, which does not exist"
    for path in (folder / "b.jsonl", folder, folder / "*.jsonl"):
        with pytest.raises(UserError, match=message):
            load_data(str(path))


def test_damaged_binary_data_says_damaged_not_utf8(tmp_path):
    import datasets
    import pyarrow as pa

    ds = datasets.Dataset.from_dict({"input": ["q" * 40] * 64, "output": ["a"] * 64})
    ds.to_parquet(str(tmp_path / "good.parquet"))
    raw = (tmp_path / "good.parquet").read_bytes()
    with (
        pa.OSFile(str(tmp_path / "good.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, ds.data.table.schema) as w,
    ):
        w.write_table(ds.data.table)
    arrow = (tmp_path / "good.arrow").read_bytes()
    cases = {
        "cut.parquet": raw[: len(raw) // 2],
        "headless.parquet": raw[4:],
        "text.parquet": b"a,b\n1,2\n",
        "cut.arrow": arrow[: len(arrow) // 2],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        builder = name.rsplit(".", 1)[1]
        with pytest.raises(UserError) as info:
            load_data(str(tmp_path / name))
        message = str(info.value)
        assert message.startswith(f"data file {tmp_path / name} is not a readable {builder} file ("), message
        assert f"damaged, truncated (a copy or download cut short?) or not {builder} at all" in message
        assert "UTF-8" not in message
    assert (
        len(load_data(str(tmp_path / "good.parquet"))) == 64 == len(load_data(str(tmp_path / "good.arrow")))
    )


# --- disk full while saving -----------------------------------------------------------------------------


def test_disk_full_detection(tmp_path):
    assert is_disk_full(OSError(28, "No space left on device"), tmp_path)
    assert is_disk_full(RuntimeError("safetensors: IoError StorageFull"), tmp_path)
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 113600 vs 113488")
    assert not is_disk_full(wrapped, tmp_path)  # plenty of space left here: some other write failure


def _train_argv(tiny_model_dir, data, out, *extra) -> list[str]:
    return ["--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(data), "--output_dir",
            str(out), "--torch_dtype", "float32", "--per_device_train_batch_size", "4", *extra]  # fmt: skip


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_names_the_intact_one(
    tmpfs, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    monkeypatch.setenv("TERMINATION_LOG_FILE", str(tmp_path / "log"))
    data = write_jsonl(tmp_path / "d.jsonl", io_rows(1))
    probe = tmp_path / "probe"
    assert (
        sft_trainer.main(_train_argv(tiny_model_dir, data, probe, "--max_steps", "1", "--save_steps", "1"))
        == 0
    )
    size = _folder_bytes(probe / "checkpoint-1")
    disk = tmpfs(f"{size * 3 // 2 // 1024}k")  # room for one checkpoint, not two
    out = disk / "out"
    capsys.readouterr()
    code = sft_trainer.main(_train_argv(tiny_model_dir, data, out, "--max_steps", "3", "--save_steps", "1"))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == USER_ERROR_EXIT_CODE, line
    assert line == (
        f"error: no space left on device writing {out / 'checkpoint-2'}; checkpoint-1 is intact and the partial "
        "files were removed; free space (or lower --save_total_limit) and rerun the same command to resume"
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "checkpoint-1" / "checkpoint_complete.json").is_file()


@pytest.mark.slow
def test_disk_full_writing_the_final_model(tmpfs, tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("TERMINATION_LOG_FILE", str(tmp_path / "log"))
    data = write_jsonl(tmp_path / "d.jsonl", io_rows(1))
    disk = tmpfs("64k")  # smaller than the model's weights
    out, final = tmp_path / "out", disk / "final"
    argv = _train_argv(
        tiny_model_dir, data, out, "--max_steps", "1", "--save_steps", "1", "--save_model_dir", str(final)
    )
    assert sft_trainer.main(argv) == USER_ERROR_EXIT_CODE
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        f"error: no space left on device writing the final model to {final}; checkpoint-1 is intact"
    )
    assert list(disk.iterdir()) == [disk / "existing"]  # the partial temporary folder is gone


# --- excerpts of data rows ------------------------------------------------------------------------------


def test_excerpt_clips_and_says_how_long():
    assert excerpt("short") == "'short'"
    long = "s" * 500
    assert excerpt(long) == f"{'s' * EXCERPT_CHARS!r}... (500 chars)"


SECRET = "SECRET-HEAD " + "x" * 300 + " SECRET-TAIL"


def test_no_error_quotes_more_than_an_excerpt_of_a_row(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("TERMINATION_LOG_FILE", str(tmp_path / "log"))
    common = one_step(tiny_model_dir, tmp_path / "o")
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": SECRET}, {"text": 5}])
    numbers = write_jsonl(tmp_path / "n.jsonl", [{"text": 7, "other": SECRET}])
    chats = write_jsonl(
        tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": SECRET}, MESSAGES[1]]}]
    )
    csv = tmp_path / "bad.csv"
    csv.write_text("a,b\n1,2\n" + ",".join([SECRET] * 3) + "\n")
    runs = [
        ["--training_data_path", str(text), "--dataset_text_field", "text", "--response_template", "nowhere"],
        ["--training_data_path", str(numbers), "--data_formatter_template", "{{ other }}{{ 1 / 0 }}"],
        ["--training_data_path", str(chats), "--chat_template", "{{ raise_exception(messages[0].content) }}"],
        ["--training_data_path", str(csv), "--dataset_text_field", "a"],
    ]
    for extra in runs:
        assert sft_trainer.main([*common, *extra]) == USER_ERROR_EXIT_CODE
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "SECRET-TAIL" not in line and "x" * (EXCERPT_CHARS + 1) not in line, line
        assert len(line) < 600, line
    assert (tmp_path / "log").read_text().count("SECRET-TAIL") == 0


def test_excerpts_are_clipped_in_column_type_errors(tmp_path, tokenizer):
    from tuning.config.args import DataArgs
    from tuning.data.formats import render_batch

    args = DataArgs(dataset_text_field="text")
    with pytest.raises(UserError) as info:
        render_batch({"text": [json.loads(json.dumps([SECRET]))]}, "text", args)
    assert "SECRET-TAIL" not in str(info.value)
    assert str(info.value).endswith(f"... ({len(repr([SECRET]))} chars)")


@pytest.mark.parametrize(
    ("errno_", "fix"), [(28, "free some space"), (30, "writable filesystem"), (13, "permissions")]
)
def test_every_command_reports_filesystem_refusals_as_user_errors(errno_, fix, tmp_path, monkeypatch, capsys):
    from tuning.errors import run_command

    monkeypatch.setenv("TERMINATION_LOG_FILE", str(tmp_path / "log"))

    def body() -> int:
        raise OSError(errno_, os.strerror(errno_), "/data/out/training_logs.jsonl")

    assert run_command(body) == USER_ERROR_EXIT_CODE
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: cannot access /data/out/training_logs.jsonl: ") and fix in line
