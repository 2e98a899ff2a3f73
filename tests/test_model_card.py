"""What a run hands to the people who serve its model: a model card naming what was trained (full and
LoRA), the base model's license and ``use_cache``, the loss curve; and a log file without progress-bar
frames. The full-model run also comes in through fms-hf-tuning's job variable with no arguments."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
from huggingface_hub.repocard import metadata_load

from tests.conftest import REPO, io_rows, write_json
from tuning.config import parse_config
from tuning.model import generation_use_cache
from tuning.outputs.model_card import base_license, hub_dataset_id, hub_model_id, training_method
from tuning.testing.tiny_model import build_model
from tuning.train import read_training_logs

BASE = ["--model_name_or_path", "m", "--training_data_path", "d", "--output_dir", "o"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def base_with_card(src, dest, front_matter: str):
    shutil.copytree(src, dest)
    (dest / "README.md").write_text(f"---\n{front_matter}---\n\n# The base model\n", encoding="utf-8")
    return dest


@pytest.mark.slow
def test_full_model_job_from_the_environment(tmp_path, tiny_model_dir):
    """``SFT_TRAINER_CONFIG_JSON_PATH=job.json python -m tuning.sft_trainer``, stderr into a file: the job
    runs; the log holds no progress bar; the model folder has a card and the base's use_cache."""
    base = base_with_card(tiny_model_dir, tmp_path / "base", "license: apache-2.0\n")
    out, final = tmp_path / "out", tmp_path / "out" / "final"
    data = write_json(tmp_path / "train.json", io_rows(2))
    job = {
        "model_name_or_path": str(base),
        "training_data_path": str(data),
        "validation_data_path": str(data),
        "output_dir": str(out),
        "save_model_dir": str(final),
        "torch_dtype": "float32",
        "use_flash_attn": False,
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "logging_steps": 1.0,  # fms-hf-tuning's own job examples write step counts as floats
        "eval_steps": 2,
        "save_steps": 2,
        "learning_rate": 1e-3,
        "accelerate_launch_args": {"num_processes": 1},  # tuning launch's part: set aside here
    }
    (tmp_path / "job.json").write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "SFT_TRAINER_CONFIG_JSON_PATH": str(tmp_path / "job.json")}
    env.pop("SFT_TRAINER_CONFIG_JSON_ENV_VAR", None)
    with open(tmp_path / "stderr.log", "w", encoding="utf-8") as err:
        done = subprocess.run(
            [sys.executable, "-m", "tuning.sft_trainer"], stdout=subprocess.DEVNULL, stderr=err,
            env=env, cwd=REPO, timeout=300, check=False,
        )  # fmt: skip
    log = (tmp_path / "stderr.log").read_text(encoding="utf-8")
    assert done.returncode == 0, log[-3000:]
    assert "reading the job file" in log and "done: 4 steps" in log
    # no tqdm frame anywhere: no carriage return, no bar, no rate, none of transformers' bar titles
    for debris in ("\r", "it/s]", "█", "Loading weights", "Writing model shards", "Map:"):
        assert debris not in log, debris

    for folder in (final, out / "checkpoint-2"):  # what we save generates with a cache, like the base
        assert json.loads((folder / "config.json").read_text())["use_cache"] is True
    base_generation = json.loads((base / "generation_config.json").read_text())
    assert json.loads((final / "generation_config.json").read_text()) == base_generation

    summary = json.loads((out / "run_summary.json").read_text())
    card = (final / "README.md").read_text(encoding="utf-8")
    meta = metadata_load(final / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"  # inherited from the base model's card
    assert "base_model" not in meta  # a local folder is no Hub id; the text names it
    assert {"tuning", "sft", "full-fine-tuning"} <= set(meta["tags"])
    assert f"A fine-tuned version of `{base}` (a local folder)" in card
    assert "- Method: full fine-tuning: every weight trained" in card
    assert f"| final | {summary['final_loss']:.4f} | {summary['final_validation_loss']:.4f} |" in card
    assert f"| best | {summary['best_loss']:.4f} | {summary['best_validation_loss']:.4f} |" in card
    assert "| max_steps | 4 |" in card and "| learning_rate | 0.001 |" in card
    assert "| max_seq_length | 512 |" in card  # the length used: 4096 capped by the model's context
    assert f"- train: `{data}`" in card
    assert "![training and validation loss](loss.png)" in card
    assert (final / "loss.png").read_bytes()[:8] == PNG_MAGIC
    train, valid = (
        read_training_logs(out),
        {r["step"]: r["value"] for r in read_training_logs(out, "validation_loss")},
    )
    for r in train:  # 4 logged steps: all in the table (at most 12 rows, evenly spaced)
        shown = f"{valid[r['step']]:.4f}" if r["step"] in valid else ""
        assert f"| {r['step']} | {r['epoch']:.2f} | {r['value']:.4f} | {shown} |" in card
    assert f"- transformers {__import__('transformers').__version__}" in card


@pytest.mark.slow
def test_lora_adapter_card_names_the_hub_base_and_the_adapter(tmp_path, tiny_model_dir):
    """A base from the Hugging Face cache is named by its Hub id; the card replaces peft's generic one."""
    from tuning.sft_trainer import run

    snapshot = tmp_path / "hub" / "models--acme--tiny-base" / "snapshots" / "0123abcd"
    snapshot.parent.mkdir(parents=True)
    base_with_card(
        tiny_model_dir, snapshot, "license: other\nlicense_name: acme-open\nlicense_link: LICENSE\n"
    )
    final = tmp_path / "adapter"
    argv = [
        *("--model_name_or_path", str(snapshot), "--output_dir", str(tmp_path / "out")),
        *("--training_data_path", str(write_json(tmp_path / "d.json", io_rows(1)))),
        *("--torch_dtype", "float32", "--use_flash_attn", "false", "--max_steps", "2"),
        *("--save_strategy", "no", "--save_model_dir", str(final), "--peft_method", "lora"),
        *(
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
            "--lora_dropout",
            "0.0",
            "--target_modules",
            "q_proj",
            "v_proj",
        ),
        *("--add_special_tokens", "<|tool|>"),
    ]
    run(parse_config(argv))
    card = (final / "README.md").read_text(encoding="utf-8")
    meta = metadata_load(final / "README.md")
    assert meta["base_model"] == "acme/tiny-base" and meta["library_name"] == "peft"
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "acme-open", "LICENSE")
    assert {"lora", "transformers", "base_model:adapter:acme/tiny-base"} <= set(meta["tags"])
    assert "An adapter for [acme/tiny-base](https://huggingface.co/acme/tiny-base)" in card
    assert "# tiny-base, fine-tuned" in card
    assert "- Method: LoRA: rank 4, alpha 8, dropout 0.0; on q_proj, v_proj" in card
    assert "- License: `other` (acme-open, LICENSE), inherited from the base model." in card
    assert "| add_special_tokens | `<\\|tool\\|>` |" in card  # a bare | would end the table cell
    # added tokens: servers whose LoRA loaders take no new vocabulary need the merged model
    assert f"`tuning merge --adapter {final} --output merged`" in card
    assert "Model Card for Model ID" not in card  # peft's template heading: replaced, not appended to
    assert "- peft " in card


def test_training_method_reads_the_modes_of_the_config():
    def method(*flags, quant=None):
        return training_method(parse_config([*BASE, *flags]), quant)

    assert method() == ("full fine-tuning: every weight trained", ["full-fine-tuning"])
    assert method("--peft_method", "lora", "--use_dora", "true") == (
        "LoRA: rank 8, alpha 32, dropout 0.05, DoRA; on peft's default for the architecture",
        ["lora"],
    )
    assert method("--peft_method", "pt", "--num_virtual_tokens", "4")[0] == (
        "prompt tuning: 4 virtual tokens, initialised random"
    )
    # a base kept quantized under an adapter is QLoRA; a dequantized checkpoint trains like any model
    four_bit = SimpleNamespace(quant_method="bitsandbytes")
    assert method("--peft_method", "lora", quant=four_bit) == (
        "QLoRA (LoRA on the frozen bitsandbytes-quantized base): rank 8, alpha 32, dropout 0.05; on peft's "
        "default for the architecture",
        ["lora", "qlora"],
    )
    mxfp4 = SimpleNamespace(quant_method="mxfp4", dequantize=True)
    assert method(quant=mxfp4)[0] == (
        "full fine-tuning: every weight trained; the mxfp4 checkpoint was dequantized to bfloat16 on load"
    )


def test_hub_ids_only_for_what_is_on_the_hub(tmp_path):
    assert hub_model_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert hub_model_id("gpt2") == "gpt2"
    assert hub_model_id(str(tmp_path)) is None  # an existing local folder
    assert hub_model_id("./not/a valid id") is None
    snapshot = tmp_path / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    assert hub_model_id(str(snapshot)) == "meta-llama/Llama-3.2-1B"
    assert hub_dataset_id("tatsu-lab/alpaca") == "tatsu-lab/alpaca"
    (tmp_path / "train.jsonl").write_text("{}\n")
    assert hub_dataset_id(str(tmp_path / "train.jsonl")) is None


def test_license_from_the_base_card_else_nothing(tmp_path):
    assert base_license(str(tmp_path)) == {}  # no README.md
    (tmp_path / "README.md").write_text("---\nlicense: llama3.2\ntags: [x]\n---\ntext\n")
    assert base_license(str(tmp_path)) == {"license": "llama3.2"}
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")  # a broken card never fails a run
    assert base_license(str(tmp_path)) == {}
    assert base_license("acme/not-cached") == {}  # offline (HF_HUB_OFFLINE=1) and not in the cache


@pytest.mark.parametrize("base_value", [True, False])
def test_saving_writes_the_base_use_cache_and_training_keeps_it_off(tokenizer, tmp_path, base_value):
    model = build_model(len(tokenizer))
    model.tuning_base_use_cache = base_value  # what load_model records before switching the cache off
    model.config.use_cache = False
    with generation_use_cache(model):
        model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["use_cache"] is base_value
    assert model.config.use_cache is False  # training (and padding-free exactness) goes on without a cache
    plain = build_model(len(tokenizer))  # a model we did not load: left alone
    with generation_use_cache(plain):
        assert plain.config.use_cache is True


def test_a_card_that_fails_never_fails_the_finished_run(monkeypatch, tmp_path, caplog):
    from tuning.outputs import model_card

    def broken(*args, **kwargs):
        raise KeyError("final_loss")

    monkeypatch.setattr(model_card, "render_model_card", broken)
    config = parse_config([*BASE[:4], "--output_dir", str(tmp_path)])
    with caplog.at_level(logging.WARNING, logger="tuning.outputs.model_card"):
        assert model_card.write_model_card(tmp_path, config, {}, None) is None
    assert caplog.messages == ["README.md not written: KeyError: 'final_loss'"]
    assert not (tmp_path / "README.md").exists()
