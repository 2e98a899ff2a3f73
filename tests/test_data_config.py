"""Data configs: schema validation, the reference tool's config formats (our own copies), mixing,
splits, streaming, --do_dataprocessing_only and preview. Tiny tokenizer ids: ``c`` → ``ord(c) - 28``."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import datasets
import pytest
from conftest import io_rows, write_jsonl

from tuning import preview, sft_trainer
from tuning.config import parse_config
from tuning.config.args import DataArgs
from tuning.data import build_datasets
from tuning.data.tokenize import IGNORE_INDEX
from tuning.errors import UserError
from tuning.testing.tiny_model import build_tokenizer

X = IGNORE_INDEX
CHATS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b."}]},
]
# The seed's example from the issue, verbatim but for a local chat file instead of the hub id.
SEED_CONFIG = """dataprocessor:
    type: default
datasets:
  - name: dataset_1
    data_paths:
      - "{path}"
    data_handlers:
      - name: tokenize_and_apply_chat_template_with_masking
        arguments:
          remove_columns: all
          fn_kwargs:
            conversation_column_name: "messages"
"""
INPUT_MASKING = """dataprocessor:
    type: default
    sampling_stopping_strategy: first_exhausted
    seed: 66
datasets:
{datasets}"""
IO_DATASET = """  - name: {name}
    {extra}
    data_paths:
      - "{path}"
    data_handlers:
      - name: tokenize_and_apply_input_masking
        arguments:
          remove_columns: all
          batched: false
          fn_kwargs:
            input_column_name: input
            output_column_name: output
"""


@pytest.fixture()
def chat_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", CHATS * 4)


@pytest.fixture()
def io_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "io.jsonl", io_rows(1))


def write_config(tmp_path: Path, text: str, name: str = "data.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def io_config(tmp_path: Path, io_file: Path, *extras: str) -> Path:
    body = "".join(IO_DATASET.format(name=f"d{i}", extra=e, path=io_file) for i, e in enumerate(extras))
    return write_config(tmp_path, INPUT_MASKING.format(datasets=body))


def build(config: Path, tokenizer=None, max_len: int = 512):
    # the job's entry point: it builds the encoding context and carries the job's template to the tokenizer
    return build_datasets(DataArgs(data_config_path=str(config)), tokenizer or build_tokenizer(), max_len, ())


def main_args(config: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data_config_path",
        str(config),
        "--model_name_or_path",
        str(model),
        "--output_dir",
        str(out),
        *extra,
    ]


def test_seed_example_runs_with_a_local_chat_file(tmp_path, chat_file, tiny_model_dir):
    config = write_config(tmp_path, SEED_CONFIG.format(path=chat_file))
    out = tmp_path / "out"
    args = main_args(
        config, tiny_model_dir, out, "--do_dataprocessing_only", "--num_train_dataset_shards", "2"
    )
    assert sft_trainer.main(args) == 0
    shards = sorted(p.name for p in (out / "train").iterdir())
    assert shards == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    train = datasets.load_dataset("parquet", data_files=str(out / "train" / "*.parquet"), split="train")
    assert train.column_names == ["input_ids", "labels"] and len(train) == 8
    # <s><|user|>\nhi</s>\n<|assistant|>\n + trained: yo</s> (through the stop token, nothing after)
    assert train[0]["labels"] == [X] * 28 + [93, 83, 2]
    assert not (out / "validation").exists()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("datasets: [", "is not valid YAML"),
        (
            SEED_CONFIG.replace("tokenize_and_apply_chat", "tokenise_and_apply_chat"),
            "unknown data handler 'tokenise_and_apply_chat_template_with_masking' (did you mean 'tokenize_and_apply_chat_template_with_masking'?)",
        ),
        (
            SEED_CONFIG.replace('"messages"', '"conversation"'),
            "dataset 'dataset_1': data_handlers[0] (tokenize_and_apply_chat_template_with_masking): column 'conversation' is not in the data; columns: ['messages']",
        ),
        (
            SEED_CONFIG.replace("    data_paths:", "    sampling: 1.5\n    data_paths:"),
            "sampling ratio 1.5 is out of range",
        ),
        (
            SEED_CONFIG.replace(
                "    data_paths:", "    split: {train: 0.0, validation: 0.5}\n    data_paths:"
            ),
            "no training rows are left after split",
        ),
        (
            SEED_CONFIG.replace("data_paths:", "data_path:"),
            "unknown key 'data_path' (did you mean 'data_paths'?)",
        ),
        (SEED_CONFIG.replace("type: default", "type: default\n    streaming: true"), "pass --max_steps"),
        (
            SEED_CONFIG.replace("type: default", "type: default\n    chat_template_base64: '%%%'"),
            "chat_template_base64 is not base64",
        ),
    ],
    ids=[
        "bad-yaml",
        "unknown-handler",
        "wrong-column",
        "ratio-range",
        "no-train-rows",
        "unknown-key",
        "streaming-no-max-steps",
        "bad-base64",
    ],
)
def test_bad_configs_exit_1_with_one_line(tmp_path, chat_file, tiny_model_dir, capsys, text, expected):
    config = write_config(tmp_path, text.replace("{path}", str(chat_file)))
    assert sft_trainer.main(main_args(config, tiny_model_dir, tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: data config {config}")
    assert expected in err[-1]


def test_data_config_flag_prefix_and_exclusive_with_training_data(tmp_path, chat_file):
    config = write_config(tmp_path, SEED_CONFIG.format(path=chat_file))
    parsed = parse_config(["--data_config", str(config), "--model_name_or_path", "m", "--output_dir", "o"])
    assert parsed.data.data_config_path == str(config)
    with pytest.raises(Exception, match="--training_data_path and --data_config_path both name data"):
        parse_config(
            [
                "--data_config_path",
                str(config),
                "--training_data_path",
                "x",
                "--model_name_or_path",
                "m",
                "--output_dir",
                "o",
            ]
        )


def test_reference_tool_names_warn_once_each(tmp_path, chat_file, caplog):
    text = SEED_CONFIG.replace(
        'conversation_column_name: "messages"',
        'conversation_column: "messages"\n            formatted_text_column_name: "t"',
    )
    config = write_config(tmp_path, text.format(path=chat_file))
    with caplog.at_level(logging.WARNING):
        data = build(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        sum("'conversation_column' is deprecated, use 'conversation_column_name'" in w for w in warnings) == 1
    )
    assert sum("'formatted_text_column_name' is ignored" in w for w in warnings) == 1
    assert len(data.train) == 8


def test_sampling_split_and_concatenation(tmp_path, io_file):
    config = io_config(
        tmp_path, io_file, "sampling: 0.5\n    split: {train: 0.75, validation: 0.25}", "sampling: 0.5"
    )
    first, second = build(config), build(config)
    assert len(first.validation) == 2  # 25% of 8 rows
    assert first.train["input_ids"] == second.train["input_ids"]  # seeded
    assert first.stats.rows == 16 and first.data_format == "data_config"
    concatenated = build(io_config(tmp_path, io_file, "split: {train: 0.5}", "dataset_split_name: train"))
    assert len(concatenated.train) == 4 + 8 and concatenated.validation is None


def test_split_validation_only_dataset(tmp_path, io_file):
    data = build(io_config(tmp_path, io_file, "sampling: 1.0", "split: {validation: 1.0}"))
    assert len(data.train) == 8 and len(data.validation) == 8


def test_streaming_gives_an_iterable_train_set(tmp_path, io_file):
    config = io_config(tmp_path, io_file, "")
    config.write_text(config.read_text().replace("seed: 66", "seed: 66\n    streaming: true"))
    data = build(config)
    assert isinstance(data.train, datasets.IterableDataset)
    row = next(iter(data.train))
    assert row["labels"][-1] == 2 and row["labels"][0] == X


def test_unsupported_suffix_without_a_builder_is_a_user_error_on_every_load_path(tmp_path, io_file):
    """Streaming and non-train splits load through datasets directly: the file's suffix is still checked."""
    rows = tmp_path / "rows.txt"
    rows.write_text(io_file.read_text())
    streaming = io_config(tmp_path, rows, "")
    streaming.write_text(streaming.read_text().replace("seed: 66", "seed: 66\n    streaming: true"))
    (tmp_path / "split").mkdir()
    (tmp_path / "plain").mkdir()
    split = io_config(tmp_path / "split", rows, "dataset_split_name: validation")
    plain = io_config(tmp_path / "plain", rows, "")
    for config in (streaming, split, plain):
        with pytest.raises(UserError, match=r"rows.txt has an unsupported extension; use one of .json"):
            build(config)
    (tmp_path / "named").mkdir()
    named = build(io_config(tmp_path / "named", rows, "builder: json"))  # a named builder reads any suffix
    assert len(named.train) == len(io_file.read_text().splitlines())


def test_reference_formats_column_handlers_and_pretokenized(tmp_path):
    rows = [{"input_ids": [1, 5, 6], "x": "a"}, {"input_ids": [1, 5, 6, 7, 8, 9], "x": "b"}]
    path = write_jsonl(tmp_path / "ids.jsonl", rows)
    config = write_config(
        tmp_path,
        f"""datasets:
  - name: pretok
    data_paths: ["{path}"]
    data_handlers:
      - name: duplicate_columns
        arguments:
          fn_kwargs: {{existing_column_name: input_ids, new_column_name: labels}}
      - name: skip_samples_with_large_columns
        arguments:
          fn_kwargs: {{column_name: input_ids, max_allowed_length: 4}}
      - name: rename_columns
        arguments:
          column_mapping: {{x: y}}
""",
    )
    data = build(config)
    assert data.train[:] == {"input_ids": [[1, 5, 6]], "labels": [[1, 5, 6]]}


def test_reference_formats_templates_and_base64_chat_template(tmp_path, io_file, chat_file):
    row_template = "{% for m in messages['messages'] %}{{ m['content'] }}|{% endfor %}"
    encoded = base64.b64encode(row_template.encode()).decode()
    config = write_config(
        tmp_path,
        f"""dataprocessor:
    chat_template_base64: '{encoded}'
datasets:
  - name: jinja
    data_paths: ["{io_file}"]
    data_handlers:
      - name: apply_custom_data_formatting_template
        arguments:
          remove_columns: all
          fn_kwargs:
            dataset_text_field: formatted
            template: "{{{{input}}}} => {{{{output}}}}{{{{eos_token}}}}"
  - name: chat
    data_paths: ["{chat_file}"]
    data_handlers:
      - name: apply_tokenizer_chat_template
        arguments:
          remove_columns: all
          fn_kwargs: {{formatted_text_column_name: formatted}}
""",
    )
    tokenizer = build_tokenizer()
    data = build(config, tokenizer)
    assert tokenizer.chat_template == row_template  # saved with the model
    texts = [tokenizer.decode(ids) for ids in data.train["input_ids"]]
    assert texts[0] == "<s>@HMRCcustomers No this is my first job => no complaint</s>"
    assert texts[8] == "<s>hi|yo|</s>"  # text rows: BOS and EOS added, every token trained
    assert data.train[8]["labels"] == [X] + data.train[8]["input_ids"][1:]  # all but BOS


def test_preview_marks_trained_tokens_and_counts(tmp_path, chat_file, tiny_model_dir, capsys):
    config = write_config(tmp_path, SEED_CONFIG.format(path=chat_file))
    argv = ["--data_config_path", str(config), "--model_name_or_path", str(tiny_model_dir), "--preview", "1"]
    assert preview.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "== dataset_1: 8 samples from 8 of 8 rows kept; 248 tokens, 24 trained, 0 truncated, 0 samples dropped"
        in out
    )
    assert "-- sample 0: 31 tokens, 3 trained\n<s><|user|>\nhi</s>\n<|assistant|>\n[[yo</s>]]\n" in out
    assert "-- sample 1" not in out


@pytest.mark.slow
def test_training_with_split_evaluates_on_the_validation_union(tmp_path, io_file, tiny_model_dir):
    config = io_config(
        tmp_path,
        io_file,
        "sampling: 0.7\n    split: {train: 0.5, validation: 0.5}",
        "sampling: 0.3\n    split: {train: 0.75, validation: 0.25}",
    )
    out = tmp_path / "out"
    args = main_args(
        config,
        tiny_model_dir,
        out,
        "--max_steps",
        "2",
        "--torch_dtype",
        "float32",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--per_device_eval_batch_size",
        "8",
    )
    assert sft_trainer.main(args) == 0
    logs = (out / "training_logs.jsonl").read_text()
    assert '"name": "validation_loss"' in logs


def test_packing_applies_to_the_mixed_train_set(tmp_path, io_file):
    config = io_config(tmp_path, io_file, "")
    plain = build(config, max_len=64)
    args = DataArgs(data_config_path=str(config), packing=True, packing_strategy="wrapped")
    packed = build_datasets(args, build_tokenizer(), 64, ())
    assert [len(r) for r in packed.train["input_ids"]][:-1] == [64] * (len(packed.train) - 1)
    assert sum(map(len, packed.train["input_ids"])) == sum(map(len, plain.train["input_ids"]))
    # the default, bfd: whole samples, positions restarting per sample, every token kept
    bfd = build_datasets(DataArgs(data_config_path=str(config), packing=True), build_tokenizer(), 64, ())
    assert sorted(map(len, bfd.train["input_ids"])) == sorted(map(len, plain.train["input_ids"]))
    assert all(p[0] == 0 for p in bfd.train["position_ids"])
