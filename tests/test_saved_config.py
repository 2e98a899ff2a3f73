"""The saved model's ``config.json`` and ``generation_config.json`` keep the base's special-token ids
(transformers' Trainer aligns them with the tokenizer's during training: a Qwen3 base's ``pad_token_id``
null came back as 151643), on every real tokenizer we have, unless the run added the token."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import REPO, write_jsonl
from tuning import sft_trainer
from tuning.tiny import write_tiny_from_config

REAL = REPO.parent / "shared" / "real-tokenizers"
FAMILIES = ("qwen3", "llama3.2", "mistral-v0.3", "gpt-oss")
IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _ids(folder, name: str) -> dict:
    path = folder / name
    values = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {k: values.get(k) for k in IDS}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_saved_config_keeps_the_bases_special_token_ids(family, tmp_path):
    if not (REAL / family / "tokenizer_config.json").is_file():
        pytest.skip(f"real {family} tokenizer not found under {REAL}")
    base = write_tiny_from_config(REAL / family, tmp_path / "base")
    rows = [{"text": f"A short line number {i} to learn."} for i in range(4)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path", str(base), "--training_data_path", str(data), "--output_dir", str(out),
        "--dataset_text_field", "text", "--max_steps", "1", "--save_strategy", "no", "--torch_dtype", "float32",
        "--per_device_train_batch_size", "2", "--save_model_dir", str(out / "final"), "--memory_check", "off",
    ]  # fmt: skip
    said: list[str] = []
    heard = logging.Handler()
    heard.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    aligning = logging.getLogger("transformers.trainer_utils")  # where the Trainer says it aligned ids
    aligning.addHandler(heard)
    try:
        assert sft_trainer.main(argv) == 0
    finally:
        aligning.removeHandler(heard)
    assert not [s for s in said if "new PAD/BOS/EOS tokens" in s]  # untrue here: the saved ids are the base's
    for name in ("config.json", "generation_config.json"):
        assert _ids(out / "final", name) == _ids(base, name), name


def test_a_token_the_run_added_is_kept(tiny_model_dir):
    """The one case the ids may change: the run added the token (the base has no such id)."""
    import torch

    from tuning.config import DataArgs, ModelArgs
    from tuning.model import generation_use_cache, load_model, load_tokenizer, precision_plan

    args = ModelArgs(model_name_or_path=str(tiny_model_dir), torch_dtype="float32")
    tokenizer = load_tokenizer(args, DataArgs(add_special_tokens=["<|end|>"]))
    from transformers import AutoConfig

    plan = precision_plan(args, AutoConfig.from_pretrained(tiny_model_dir), "none", "adamw_torch")
    model = load_model(args, plan, tokenizer)
    new_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert model.get_input_embeddings().weight.shape[0] == new_id + 1 and plan.load_dtype == torch.float32
    model.config.eos_token_id, model.config.pad_token_id = new_id, 2  # what the Trainer's alignment does
    with generation_use_cache(model):
        assert (model.config.eos_token_id, model.config.pad_token_id) == (new_id, None)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (new_id, 2)  # training's, after saving
