"""Sample generations at each evaluation (text and chat, LoRA and full fine-tuning), equal to what the
saved model generates; early stopping at the right step, also across a resume. Real CLI, in process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, text_rows, write_json, write_jsonl
from tuning import sft_trainer
from tuning.train import read_eval_generations, read_training_logs

REAL = REPO.parent / "shared" / "real-tokenizers"


def _text_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--training_data_path", str(data),
        "--validation_data_path", str(data), "--output_dir", str(out),
        "--dataset_text_field", "output", "--response_template", "\n### Label:",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--torch_dtype", "float32",
        "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "2", *extra,
    ]  # fmt: skip


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """An independent greedy answer of the saved model (plain transformers generate)."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id
        )
    new = out[0, ids.shape[1] :].tolist()
    return tokenizer.decode(new[:-1] if new and new[-1] == tokenizer.eos_token_id else new)


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_text_generations_at_each_evaluation_equal_the_saved_model(tmp_path, tiny_model_dir, peft):
    data = write_json(tmp_path / "data.json", text_rows(1))  # 8 rows
    out = tmp_path / "out"
    argv = _text_args(tiny_model_dir, data, out, "--max_steps", "4", "--peft_method", peft)
    argv += ["--eval_generations", "3", "--eval_max_new_tokens", "6", "--save_model_dir", str(out / "final")]
    argv += ["--trackers", "tensorboard"]
    assert sft_trainer.main(argv) == 0
    records = read_eval_generations(out)
    assert [r["step"] for r in records] == [2, 2, 2, 4, 4, 4]
    assert all(
        r["prompt"].endswith("\n\n### Label:") and r["prompt"].startswith("<s>### Text: ") for r in records
    )
    assert [r["reference"] for r in records[:3]] == [" no complaint", " no complaint", " complaint"]
    assert all(r["new_tokens"] <= 6 for r in records)

    final = out / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    if peft == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    else:
        model = AutoModelForCausalLM.from_pretrained(final)
    model.eval()
    for record in records[3:]:  # the last evaluation ran on the final weights
        assert record["generation"] == _greedy(model, tokenizer, record["prompt"], 6)

    summary = json.loads((out / "run_summary.json").read_text())
    assert (
        summary["eval_generations"]["evaluations"] == 2 and len(summary["eval_generations"]["seconds"]) == 2
    )
    assert summary["final_validation_mean_token_accuracy"] is not None
    validation = read_training_logs(out, "validation_loss")
    assert [r["window_trained_tokens"] for r in validation] == [summary["trained_tokens"] // 2] * 2
    assert "## Sample generations" in (final / "README.md").read_text()
    events = b"".join(p.read_bytes() for p in (out / "tensorboard").rglob("events.*"))
    assert b"eval/eval_generations" in events


@pytest.mark.slow
def test_chat_generations_use_the_models_own_template(tmp_path):
    from tuning.testing.tiny_qwen3 import write_tiny_qwen3

    # Mistral's real template and 32k vocabulary (a 150k one makes every step of the run slower on CPU)
    if not (REAL / "mistral-v0.3").is_dir():
        pytest.skip(
            f"real tokenizer folder {REAL / 'mistral-v0.3'} is absent (see ../shared/real-tokenizers)"
        )
    model = write_tiny_qwen3(REAL / "mistral-v0.3", tmp_path / "tiny-mistral")
    conversations = [
        [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in conversations])
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path", str(model), "--training_data_path", str(data), "--validation_data_path", str(data),
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2", "--torch_dtype", "float32", "--peft_method", "lora",
        "--eval_strategy", "steps", "--eval_steps", "1", "--eval_generations", "2", "--eval_max_new_tokens", "4",
        "--save_model_dir", str(out / "final"),
    ]  # fmt: skip
    assert sft_trainer.main(argv) == 0
    tokenizer = AutoTokenizer.from_pretrained(model)
    records = read_eval_generations(out)
    assert [r["step"] for r in records] == [1, 1, 2, 2]
    for record, messages in zip(records[:2], conversations[:2], strict=True):
        expected = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
        assert record["prompt"] == expected  # the model's own template, generation prompt included
        assert record["reference"].endswith(messages[1]["content"])  # </s> left out, as in generation
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["serve_check"]["passed"] is True  # the adapter folder reloads to the trained tokens


def _stopping_args(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    # a threshold no change reaches: every evaluation after the first counts as "no improvement"
    return _text_args(model, data, out, "--max_steps", str(steps), "--eval_steps", "1", "--save_strategy", "steps",
                      "--save_steps", "1", "--early_stopping_patience", "3", "--early_stopping_threshold", "100")  # fmt: skip


@pytest.mark.slow
def test_early_stopping_stops_at_the_patience_and_keeps_its_count_across_a_resume(tmp_path, tiny_model_dir):
    data = write_json(tmp_path / "data.json", text_rows(1))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert (
        sft_trainer.main(
            [*_stopping_args(tiny_model_dir, data, whole, 10), "--save_model_dir", str(whole / "m")]
        )
        == 0
    )
    # evaluations at steps 1..4: counts 0, 1, 2, 3 = patience: stop after step 4
    summary = json.loads((whole / "run_summary.json").read_text())
    assert summary["steps"] == 4 and summary["early_stopping"]["stopped_at_step"] == 4
    assert Path(summary["early_stopping"]["best_model_checkpoint"]).is_dir()
    assert read_training_logs(whole, "early_stopping")[0]["step"] == 4
    card = (whole / "m" / "README.md").read_text()
    assert "Early stopping ended the run at step 4: `eval_loss` did not improve by more than 100 in 3" in card
    assert (
        "## Serving check" in card
        and "| trained end of turn is in generation_config.eos_token_id | pass |" in card
    )

    assert sft_trainer.main(_stopping_args(tiny_model_dir, data, resumed, 2)) == 0  # ends at 2 (counter 1)
    assert sft_trainer.main(_stopping_args(tiny_model_dir, data, resumed, 10)) == 0  # resumes from step 2
    summary = json.loads((resumed / "run_summary.json").read_text())
    assert summary["steps"] == 4  # a counter restarted at 0 would have run to step 5
    assert [r["step"] for r in read_training_logs(resumed, "early_stopping")] == [4]


def test_flags_aliases_and_what_they_need(tmp_path, tiny_model_dir):
    from tuning.config import parse_config
    from tuning.errors import UserError

    base = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--training_data_path",
        "d.json",
        "--output_dir",
        str(tmp_path),
    ]
    config = parse_config(
        [*base, "--eval_table_size", "3", "--eval_strategy", "epoch", "--early_stopping_patience", "2"]
    )
    assert config.train.eval_generations == 3 and config.train.eval_max_new_tokens == 128
    assert config.train.metric_for_best_model == "eval_loss" and config.train.greater_is_better is False
    job = tmp_path / "job.yaml"
    job.write_text("eval_generations: 2\neval_max_new_tokens: 16\neval_strategy: steps\neval_steps: 5\n")
    from_file = parse_config([*base, "--config", str(job)]).train
    assert (from_file.eval_generations, from_file.eval_max_new_tokens) == (2, 16)
    with pytest.raises(
        UserError, match="--early_stopping_patience acts at each evaluation and --eval_strategy is no"
    ):
        parse_config([*base, "--early_stopping_patience", "2"])


@pytest.mark.slow
def test_an_adapter_with_new_tokens_is_sent_to_merge_and_the_merged_folder_passes(
    tmp_path, tiny_model_dir, capsys
):
    from tuning.check import main as check_main

    data = write_json(tmp_path / "data.json", text_rows(1))
    out = tmp_path / "out"
    argv = _text_args(tiny_model_dir, data, out, "--max_steps", "1", "--peft_method", "lora")
    argv += [
        "--add_special_tokens",
        "<|turn_end|>",
        "--save_model_dir",
        str(out / "final"),
        "--serve_check",
        "error",
    ]
    assert sft_trainer.main(argv) == 0  # not servable by vLLM as an adapter is advice, not a failure
    check = json.loads((out / "run_summary.json").read_text())["serve_check"]
    assert check["passed"] and "run `tuning merge` before serving with vLLM" in check["advice"]
    assert {c["name"]: c["result"] for c in check["checks"]}[
        "vLLM can serve the adapter as it is"
    ] == "merge first"
    capsys.readouterr()
    data_flags = ["--dataset_text_field", "output", "--response_template", "\n### Label:"]
    assert check_main([str(out / "final"), "--training_data_path", str(data), *data_flags]) == 0
    printed = capsys.readouterr().out
    assert "serve check of the merged folder" in printed
    merged_table = printed.split("serve check of the merged folder")[1]
    assert "FAIL" not in merged_table
    assert re.search(
        r"saved tokenizer \+ template give the trained tokens +pass +8 samples identical", merged_table
    )
    assert re.search(r"tokenizer fits the model's embeddings +pass +363 tokens, 363 rows", merged_table)
