"""The serve-exact check: a folder saved the way the final model is saved passes on every shared real
tokenizer; the same folder with its chat template or generation_config changed afterwards fails, and
the failure names what differs. ``tuning check`` runs it from the command line (exit 1 on a mismatch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, write_jsonl
from tuning.check import main as check_main
from tuning.config.args import DataArgs
from tuning.outputs.serve_check import TRAINED_SAMPLES_NAME, check_saved_model, run_serve_check

REAL = REPO.parent / "shared" / "real-tokenizers"
FAMILIES = ["qwen3", "llama3.2", "mistral-v0.3", "gpt-oss"]
CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
    ],
]


def _saved_folder(family: str, tmp_path: Path) -> tuple[Path, object, tuple[int, ...]]:
    """What the final save writes, without weights (the check loads none): the tokenizer through
    ``save_pretrained``, the model's config and generation config."""
    from transformers import AutoConfig, AutoTokenizer

    from tuning.config.args import ModelArgs
    from tuning.model import generation_stop_ids

    source = REAL / family
    if not source.is_dir():
        pytest.skip(f"real tokenizer folder {source} is absent (see ../shared/real-tokenizers)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    folder = tmp_path / family
    tokenizer.save_pretrained(folder)
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(source / name, folder / name)
    stops = generation_stop_ids(
        ModelArgs(model_name_or_path=str(source)), AutoConfig.from_pretrained(source), tokenizer
    )
    return folder, tokenizer, stops


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(
        tmp_path_factory.mktemp("chat") / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS]
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_passes_on_every_real_tokenizer_and_fails_once_altered(family, tmp_path, chat_data):
    folder, tokenizer, stops = _saved_folder(family, tmp_path)
    data = DataArgs(training_data_path=str(chat_data))
    result = check_saved_model(folder, data, 1024, tokenizer, stops)
    assert result["passed"], result
    results = {c["name"]: c["result"] for c in result["checks"]}
    assert results["saved tokenizer + template give the trained tokens"] == "pass"
    assert results["server-rendered prompts equal the trained contexts"] == "pass"  # 3 assistant turns
    assert results["trained end of turn is in generation_config.eos_token_id"] == "pass"
    assert result["samples"] >= 2 and (folder / TRAINED_SAMPLES_NAME).is_file()

    if family not in ("qwen3", "mistral-v0.3"):  # a template file, and one inside tokenizer_config.json
        return
    # the chat template edited after saving: the files no longer give the trained tokens
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        template_file.write_text(
            "{{- 'Chat:' }}" + template_file.read_text(encoding="utf-8"), encoding="utf-8"
        )
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["chat_template"] = "{{- 'Chat:' }}" + config["chat_template"]
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    altered = run_serve_check(folder, data, 1024)
    assert not altered["passed"]
    failed = [c for c in altered["checks"] if c["result"] == "FAIL"]
    assert [c["name"] for c in failed] == ["saved tokenizer + template give the trained tokens"]
    assert "Chat:" in failed[0]["detail"] and "sample 0" in failed[0]["detail"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3.2"])
def test_generation_config_without_the_trained_end_of_turn_fails(family, tmp_path, chat_data, capsys):
    folder, tokenizer, stops = _saved_folder(family, tmp_path)
    data = DataArgs(training_data_path=str(chat_data))
    assert check_saved_model(folder, data, 1024, tokenizer, stops)["passed"]
    end_of_turn = {"qwen3": "<|im_end|>", "llama3.2": "<|eot_id|>"}[family]
    config = json.loads((folder / "generation_config.json").read_text())
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    config["eos_token_id"] = [i for i in config["eos_token_id"] if i != end_id]
    (folder / "generation_config.json").write_text(json.dumps(config))
    argv = [str(folder), "--training_data_path", str(data.training_data_path)]
    assert check_main(argv) == 1
    out = capsys.readouterr()
    assert "trained end of turn is in generation_config.eos_token_id  FAIL" in out.out
    assert f"{end_of_turn!r} (id {end_id})" in out.err  # the one-line error names the token
