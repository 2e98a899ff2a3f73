"""fms-hf-tuning 3.2 job files and commands run unchanged: its acceleration flags, its key spellings and
transformers 4's, each from the command line and from a JSON job (``$SFT_TRAINER_CONFIG_JSON_PATH``),
mean what fms-hf-tuning documents, on this tool's machinery (docs/fms-compat.md)."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest

from tests.conftest import io_rows, run_cli, write_json
from tuning.config import parse_config
from tuning.data.formats import RowTemplate
from tuning.errors import UserError

BASE = {"model_name_or_path": "m", "training_data_path": "d.json", "max_seq_length": 128}


def parse_both(tmp_path, monkeypatch, job: dict, argv: list[str]):
    """The same settings as a JSON job in the environment and as a command line: both configs."""
    out = str(tmp_path / "out")
    path = tmp_path / "job.json"
    path.write_text(json.dumps({**BASE, "output_dir": out, **job}), encoding="utf-8")
    monkeypatch.setenv("SFT_TRAINER_CONFIG_JSON_PATH", str(path))
    from_job = parse_config([])
    monkeypatch.delenv("SFT_TRAINER_CONFIG_JSON_PATH")
    flat = [f"--{k}={v}" if not isinstance(v, list) else None for k, v in BASE.items()]
    from_cli = parse_config([*[f for f in flat if f], "--output_dir", out, *argv])
    return from_job, from_cli


def test_acceleration_flags_from_job_and_command_line(tmp_path, monkeypatch, caplog):
    job = {
        "padding_free": ["huggingface"],
        "multipack": [16],
        "fast_kernels": [True, True, True],
        "per_device_train_batch_size": 4,
    }
    argv = ["--padding_free", "huggingface", "--multipack", "16", "--fast_kernels", "True", "True", "True"]
    argv += ["--per_device_train_batch_size", "4"]
    with caplog.at_level(logging.INFO):
        for config in parse_both(tmp_path, monkeypatch, job, argv):
            assert config.train.padding_free is True
            # multipack: fms's token-balanced length-grouped batches = our token budget, batch x length
            assert config.train.max_tokens_per_batch == 4 * 128
            assert [v.lower() for v in config.fms.fast_kernels] == ["true", "true", "true"]
            assert not config.train.use_liger_kernel  # no CUDA GPU / no liger-kernel here: run without
    assert "padding-free batches are this tool's default path" in caplog.text
    assert "RMSNorm/RoPE kernels (Liger) can't run" in caplog.text


@pytest.mark.parametrize(
    ("job", "argv", "needle"),
    [
        ({"fused_lora": ["auto_gptq", True]}, ["--fused_lora", "auto_gptq", "True"], "fms-acceleration-foak"),
        ({"fast_moe": [True]}, ["--fast_moe"], "fms-acceleration-moe"),
        ({"fast_moe": [2]}, ["--fast_moe", "2"], "fms-acceleration-moe"),
        ({"auto_gptq": ["triton_v2"]}, ["--auto_gptq", "triton_v2"], "pip install gptqmodel optimum"),
    ],
)
def test_kernel_plugins_that_cannot_install_here_name_what_is_missing(
    tmp_path, monkeypatch, job, argv, needle
):
    if needle == "pip install gptqmodel optimum" and importlib.util.find_spec("gptqmodel"):
        pytest.skip("gptqmodel is installed here: --auto_gptq is accepted")
    path = tmp_path / "job.json"
    path.write_text(json.dumps({**BASE, "output_dir": str(tmp_path / "o"), **job}), encoding="utf-8")
    monkeypatch.setenv("SFT_TRAINER_CONFIG_JSON_PATH", str(path))
    with pytest.raises(UserError, match=needle) as from_job:
        parse_config([])
    monkeypatch.delenv("SFT_TRAINER_CONFIG_JSON_PATH")
    with pytest.raises(UserError, match=needle):
        parse_config(
            ["--model_name_or_path", "m", "--training_data_path", "d", "--output_dir", str(tmp_path), *argv]
        )
    assert "unknown" not in str(from_job.value)


def test_transformers_4_names_are_aliases_with_one_line(tmp_path, monkeypatch, caplog):
    job = {
        "evaluation_strategy": "epoch",
        "overwrite_output_dir": True,
        "logging_dir": str(tmp_path / "tb"),
        "save_safetensors": True,
        "per_gpu_train_batch_size": 2,
        "no_cuda": True,
        "group_by_length": True,
    }
    argv = ["--evaluation_strategy", "epoch", "--overwrite_output_dir", "--logging_dir", str(tmp_path / "tb")]
    argv += [
        "--save_safetensors",
        "true",
        "--per_gpu_train_batch_size",
        "2",
        "--no_cuda",
        "--group_by_length",
    ]
    with caplog.at_level(logging.WARNING):
        for config in parse_both(tmp_path, monkeypatch, job, argv):
            assert config.train.eval_strategy == "epoch"
            assert config.trackers.tensorboard_dir == str(tmp_path / "tb")
            assert config.train.per_device_train_batch_size == 2
            assert config.train.use_cpu is True
            assert config.train.train_sampling_strategy == "group_by_length"
    lines = [r.getMessage() for r in caplog.records]
    # one line per old name and source (two sources here: the job, then the command line)
    assert sum(m.startswith("--evaluation_strategy: transformers renamed it") for m in lines) == 2
    assert sum(m.startswith("--save_safetensors:") for m in lines) == 2


def test_old_and_new_name_together_is_an_error(tmp_path):
    argv = ["--model_name_or_path", "m", "--training_data_path", "d", "--output_dir", str(tmp_path)]
    with pytest.raises(UserError, match="--evaluation_strategy and --eval_strategy are the same setting"):
        parse_config([*argv, "--evaluation_strategy", "no", "--eval_strategy", "epoch"])


def test_fms_spellings_r_tracker_bitsandbytes_and_lora_passthrough(tmp_path, monkeypatch):
    job = {
        "peft_method": "lora",
        "r": 4,
        "tracker": "tensorboard,file_logger",
        "bitsandbytes": ["nf4"],
        "fan_in_fan_out": False,
        "task_type": "CAUSAL_LM",
        "clearml_project": "proj",
        "trainer_controller_config_file": "rules.yaml",
    }
    argv = [
        "--peft_method",
        "lora",
        "--r",
        "4",
        "--tracker",
        "tensorboard,file_logger",
        "--bitsandbytes",
        "nf4",
    ]
    argv += ["--fan_in_fan_out", "false", "--task_type", "CAUSAL_LM", "--clearml_project", "proj"]
    argv += ["--trainer_controller_config_file", "rules.yaml"]
    for config in parse_both(tmp_path, monkeypatch, job, argv):
        assert config.peft.lora_r == 4
        assert config.trackers.trackers == ["file_logger", "tensorboard"]
        assert config.quant.quantization_method == "bnb_4bit"
        assert config.peft.lora_config_kwargs == {"fan_in_fan_out": False}
        assert config.trackers.clearml_project == "proj"
        assert config.fms.trainer_controller_config_file == "rules.yaml"


def test_fms_element_template_renders_the_row():
    # fms-hf-tuning's extended pre-training docs write the row as `element`
    template = RowTemplate('{{ element["text"] }} / {{ element["id"] }}', what="template")
    assert template.render({"text": "hello", "id": 7}) == "hello / 7"


@pytest.mark.slow
def test_fms_job_file_runs_and_reports_padding_free(tmp_path, tiny_model_dir):
    train = write_json(tmp_path / "train.json", io_rows(1))
    out = tmp_path / "out"
    job = {
        "model_name_or_path": str(tiny_model_dir),
        "training_data_path": str(train),
        "output_dir": str(out),
        "num_train_epochs": 1.0,
        "per_device_train_batch_size": 4,
        "torch_dtype": "float32",
        "padding_free": ["huggingface"],
        "multipack": [16],
        "fast_kernels": [True, True, True],
        "evaluation_strategy": "no",
        "overwrite_output_dir": True,
        "save_safetensors": True,
        "include_tokens_per_second": True,
        "peft_method": "lora",
        "r": 4,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "max_seq_length": 64,
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    result = run_cli([], env={"SFT_TRAINER_CONFIG_JSON_PATH": str(path)})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["padding_free"] is True
    assert "padding-free batches: each batch is one row" in result.stderr
    assert "--multipack: token-balanced batches" in result.stderr
    assert json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())["r"] == 4


def test_every_flag_in_the_fms_table_is_accepted():
    """docs/fms-compat.md lists every fms-hf-tuning 3.2 flag; each is a flag here or a spelling rewritten
    to one."""
    import re
    from pathlib import Path

    from tuning.config import build_parser
    from tuning.config.fms import is_translated

    doc = (Path(__file__).parent.parent / "docs" / "fms-compat.md").read_text(encoding="utf-8")
    table = doc.split("## Every fms-hf-tuning 3.2 flag", 1)[1]
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", table, flags=re.M)
    assert len(rows) > 200
    known = {o[2:] for a in build_parser()._actions for o in a.option_strings}
    missing = [name for name, what in rows if name not in known and not is_translated(name)]
    assert missing == []
    assert not [name for name, what in rows if "unknown" in what.lower()]


def test_fms_case_of_peft_method_and_quantization_method(tmp_path, monkeypatch):
    # fms-hf-tuning lowercases both; its docs write "peft_method": "None"
    job = {"peft_method": "None", "quantization_method": "None"}
    argv = ["--peft_method", "LORA", "--quantization_method", "NONE"]
    from_job, from_cli = parse_both(tmp_path, monkeypatch, job, argv)
    assert (from_job.peft.peft_method, from_job.quant.quantization_method) == ("none", "none")
    assert (from_cli.peft.peft_method, from_cli.quant.quantization_method) == ("lora", "none")
