"""``tuning merge``: base + adapter → a plain model folder; refusals. Adapters are built, not trained:
``init_lora_weights=False`` gives nonzero B matrices, so the merge has something to fold in."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tuning import cli
from tuning.testing.tiny_model import build_tokenizer

PROMPT = torch.tensor([[1, 55, 72, 69, 82, 4, 102, 4, 48, 69, 70, 73, 80, 30]])


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROMPT).logits


def save_adapter(folder, tiny_model_dir, config):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return save_adapter(tmp_path_factory.mktemp("adapter"), tiny_model_dir, config)


def test_merge_writes_a_sharded_plain_model_equal_to_base_plus_adapter(adapter, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    code = cli.main(["merge", "--adapter", str(adapter), "--output", str(out), "--max_shard_size", "100KB"])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
    } <= names
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2, shards
    assert not any("lora" in k for s in shards for k in load_file(out / s))
    merged = AutoModelForCausalLM.from_pretrained(out)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    assert (logits(merged) - logits(reference)).abs().max() < 1e-5
    assert (logits(merged) - logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))).abs().max() > 1e-3


def test_merge_refuses_a_non_empty_output_unless_overwrite(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(["merge", "--adapter", str(adapter), "--output", str(out)]) == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"error: --output {out} is not an empty folder; pass an empty or new folder, or --overwrite"
        )
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert cli.main(["merge", "--adapter", str(adapter), "--output", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model.safetensors").is_file()


def test_merge_takes_base_from_flag_when_adapter_names_none_that_exists(
    adapter, tiny_model_dir, tmp_path, capsys
):
    moved = shutil.copytree(adapter, tmp_path / "moved")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert cli.main(["merge", "--adapter", str(moved), "--output", str(tmp_path / "a")]) == 1
    assert "error: cannot load base model" in capsys.readouterr().err
    args = ["merge", "--adapter", str(moved), "--output", str(tmp_path / "b"), "--base", str(tiny_model_dir)]
    assert cli.main(args) == 0


def test_merge_refuses_adapters_without_mergeable_weights(tiny_model_dir, tmp_path, capsys):
    pt = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=2)
    folder = save_adapter(tmp_path / "pt", tiny_model_dir, pt)
    assert cli.main(["merge", "--adapter", str(folder), "--output", str(tmp_path / "o")]) == 1
    assert "is PROMPT_TUNING, which has no weights to fold into the base model" in capsys.readouterr().err
    assert cli.main(["merge", "--adapter", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 1
    assert "has no adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
