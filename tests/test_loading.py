"""Data paths: every supported file type, folders, globs, and the errors users hit."""

from __future__ import annotations

import datasets
import pytest

from tests.conftest import io_rows, write_json, write_jsonl
from tuning.data.loading import load_data, resolve_files
from tuning.errors import UserError


@pytest.fixture
def rows():
    return io_rows(1)


def test_json_array_and_jsonl(tmp_path, rows):
    assert load_data(str(write_json(tmp_path / "a.json", rows)))["input"] == [r["input"] for r in rows]
    assert len(load_data(str(write_jsonl(tmp_path / "a.jsonl", rows)))) == len(rows)
    # JSON lines in a .json file, as the reference tool's users write them
    assert len(load_data(str(write_jsonl(tmp_path / "lines.json", rows)))) == len(rows)


@pytest.mark.parametrize("ext", ["parquet", "arrow", "csv"])
def test_columnar_formats(tmp_path, rows, ext):
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"d.{ext}"
    if ext == "parquet":
        ds.to_parquet(str(path))
    elif ext == "csv":
        ds.to_csv(str(path), index=False)
    else:
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, ds.data.table.schema) as writer:
            writer.write_table(ds.data.table)
    loaded = load_data(str(path))
    assert loaded["output"] == [r["output"] for r in rows]


def test_folder_and_glob(tmp_path, rows):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part1.jsonl", rows[:3])
    write_jsonl(folder / "part2.jsonl", rows[3:])
    assert len(load_data(str(folder))) == len(rows)
    assert len(load_data(str(folder / "part*.jsonl"))) == len(rows)


def test_unknown_name_is_a_hub_id():
    assert resolve_files("some-org/some-dataset") is None


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (None, "missing.json", r"data file .*missing.json does not exist"),
        (b"", "empty.json", r"empty.json is empty"),
        (b"[]", "no_rows.json", r"has no rows"),
        (
            b'{"input": "a", "output": "b"}\n{"input": "a" "output": "b"}\n',
            "bad.jsonl",
            r"bad.jsonl is malformed: line 2 column",
        ),
        (b'[\n {"input": "a",\n  "output": }\n]', "bad_array.json", r"bad_array.json is malformed: line 3"),
        (b'{"input": "caf\xe9", "output": "b"}\n', "latin1.jsonl", r"not UTF-8 text \(byte 14, line 1\)"),
        (b"x", "data.txt", r"unsupported extension"),
        (  # valid JSON and valid UTF-8, but a lone UTF-16 surrogate no text column can hold
            b'{"input": "a", "output": "b"}\n{"input": "x", "output": "bad \\ud800 here"}\n',
            "surrogate.jsonl",
            r"surrogate.jsonl is malformed: line 2 holds a lone UTF-16 surrogate \(\\ud800\) in column 'output'",
        ),
        (
            b'[{"messages": [{"role": "user", "content": "hi"}]},\n'
            b' {"messages": [{"role": "user", "content": "\\udc01"}]}]',
            "surrogate.json",
            r"item 1 of the array holds a lone UTF-16 surrogate \(\\udc01\) in column 'messages'",
        ),
    ],
)
def test_bad_data_files(tmp_path, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_data(str(path))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(UserError, match="matched no files"):
        load_data(str(tmp_path / "*.jsonl"))
