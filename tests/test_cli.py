"""The documented command lines, end to end through the real CLI (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, io_rows, run_cli, text_rows, write_json, write_jsonl
from tuning.train import read_training_logs

pytestmark = pytest.mark.slow

COMMON = [
    "--num_train_epochs",
    "5",
    "--per_device_train_batch_size",
    "4",
    "--gradient_accumulation_steps",
    "4",
    "--learning_rate",
    "1e-5",
]


def assert_loss_falls(output_dir) -> list[float]:
    losses = [r["value"] for r in read_training_logs(output_dir)]
    assert len(losses) == 5, losses  # logging_strategy=epoch by default
    assert losses[-1] < losses[0], losses
    return losses


def assert_reloads_and_generates(model_dir, base_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.dtype == torch.bfloat16  # saved in the requested dtype, not the float32 master copy
    base_vocab = AutoModelForCausalLM.from_pretrained(base_dir).get_input_embeddings().weight.shape[0]
    assert model.get_input_embeddings().weight.shape[0] == base_vocab == len(tokenizer)  # no token added
    prompt = tokenizer("### Text: hello", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_first_command_line_as_a_file(tmp_path, tiny_model_dir):
    data = write_json(tmp_path / "twitter_complaints.json", text_rows())
    out = tmp_path / "out"
    result = run_cli(
        [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--tokenizer_name_or_path",
            str(tiny_model_dir),
            "--training_data_path",
            str(data),
            "--output_dir",
            str(out),
            *COMMON,
            "--response_template",
            "\\n### Label:",
            "--dataset_text_field",
            "output",
            "--save_model_dir",
            str(out / "final"),
        ],
        as_file=True,
    )
    assert result.returncode == 0, result.stderr
    assert_loss_falls(out)
    assert_reloads_and_generates(out / "final", tiny_model_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (10, 2, 4, 6, 8)]
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["response_template"] == "\n### Label:" and resolved["learning_rate"] == 1e-5
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 10 and summary["trained_tokens"] > 0
    assert "done: 10 steps" in result.stderr and str(out / "final") in result.stderr


def test_second_command_line_as_a_module(tmp_path, tiny_model_dir):
    data = write_json(tmp_path / "data.json", io_rows())
    out = tmp_path / "out"
    result = run_cli(
        [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--training_data_path",
            str(data),
            "--output_dir",
            str(out),
            *COMMON,
            "--response_template",
            "\\n## Label:",
            "--data_formatter_template",
            "### Input: {{input}} \\n\\n## Label: {{output}}",
            "--save_model_dir",
            str(out),
        ],
    )
    assert result.returncode == 0, result.stderr
    assert_loss_falls(out)
    assert_reloads_and_generates(out, tiny_model_dir)  # save_model_dir may equal output_dir
    assert "(template): 32 rows kept of 32" in result.stderr


def test_console_scripts_help():
    bin_dir = os.path.dirname(sys.executable)
    for script in ("sft_trainer", "tuning"):
        path = os.path.join(bin_dir, script)
        if not os.path.exists(path):
            pytest.fail(f"console script {script} is not installed (pip install -e .)")
    result = subprocess.run([os.path.join(bin_dir, "sft_trainer"), "--help"], capture_output=True, text=True)
    assert (
        result.returncode == 0
        and "--response_template" in result.stdout
        and "--learning_rate" in result.stdout
    )
    result = subprocess.run(
        [os.path.join(bin_dir, "tuning"), "train", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--data_formatter_template" in result.stdout


def test_config_file_with_cli_override_end_to_end(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", io_rows(2))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model_dir),
                "training_data_path": str(data),
                "output_dir": str(tmp_path / "out"),
                "num_train_epochs": 1,
                "torch_dtype": "float32",
                "logging_steps": 1,
                "logging_strategy": "steps",
                "save_strategy": "no",
                "per_device_train_batch_size": 8,
            }
        )
    )
    result = run_cli(["--config", str(cfg), "--max_steps", "1"])
    assert result.returncode == 0, result.stderr
    assert len(read_training_logs(tmp_path / "out")) == 1
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # save_strategy no: only logs


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_input_output_rows_without_template_flags(tmp_path, tiny_model_dir, fmt):
    import datasets

    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, io_rows(2))
    else:
        datasets.Dataset.from_list(io_rows(2)).to_parquet(str(path))
    result = run_cli(
        [
            "--model_name_or_path",
            str(tiny_model_dir),
            "--training_data_path",
            str(path),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
            "--torch_dtype",
            "float32",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "(input_output): 16 rows kept of 16" in result.stderr


def test_bf16_learns_like_float32(tmp_path, tiny_model_dir):
    """bf16 compute with float32 master weights ends within a few percent of a float32 run."""
    data = write_jsonl(tmp_path / "d.jsonl", io_rows(4))
    finals = {}
    for dtype in ("bfloat16", "float32"):
        out = tmp_path / dtype
        result = run_cli(
            [
                "--model_name_or_path",
                str(tiny_model_dir),
                "--training_data_path",
                str(data),
                "--output_dir",
                str(out),
                "--num_train_epochs",
                "4",
                "--per_device_train_batch_size",
                "4",
                "--learning_rate",
                "3e-3",
                "--torch_dtype",
                dtype,
                "--save_strategy",
                "no",
                "--seed",
                "7",
            ]
        )
        assert result.returncode == 0, result.stderr
        losses = [r["value"] for r in read_training_logs(out)]
        assert losses[-1] < 0.8 * losses[0], (dtype, losses)  # both really learn
        finals[dtype] = losses[-1]
    assert abs(finals["bfloat16"] - finals["float32"]) / finals["float32"] < 0.05, finals
    assert finals["bfloat16"] != finals["float32"], "identical losses: bf16 autocast was not applied"


def test_python_file_entry_imports_the_package_not_siblings():
    result = subprocess.run(
        [sys.executable, str(REPO / "tuning" / "sft_trainer.py"), "--help"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert result.returncode == 0 and "--model_name_or_path" in result.stdout
