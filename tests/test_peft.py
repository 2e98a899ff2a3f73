"""Adapters: flags, target names, precision, and LoRA / aLoRA / prompt-tuning runs that reload with plain peft.

Runs are in-process (``tuning.sft_trainer.main``) on the tiny Llama: 32 rows, batch 4, 3 epochs = 24
steps. A spy around ``apply_peft`` keeps the trained model so its logits can be compared with a reload.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import TWEETS, run_keeping_model, text_rows, write_json
from tuning import merge
from tuning.config import parse_config
from tuning.config.args import ModelArgs
from tuning.errors import UserError
from tuning.model import load_model_config, precision_plan
from tuning.model.peft import resolve_target_modules
from tuning.train import read_training_logs

ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors"}
TOKENIZER_FILES = {"chat_template.jinja", "tokenizer.json", "tokenizer_config.json"}
SERVE_CHECK_FILES = {"trained_samples.json"}  # what `tuning check` compares the saved files with
CARD_FILES = {"loss.png"}  # the model card (README.md) embeds the run's loss curve
LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
PROMPT = torch.tensor(
    [[1, 55, 72, 69, 82, 4, 102, 4, 48, 69, 70, 73, 80, 30, 4, 80, 83]]
)  # <s>There ### Label: lo


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("peft-data") / "train.json", text_rows())


@pytest.fixture
def train(tmp_path, tiny_model_dir, data_file, monkeypatch):
    """Run the trainer in-process; returns (exit code, output dir, the trained model)."""

    def _train(*extra: str, data=data_file):
        out = tmp_path / "out"
        argv = [
            *("--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(data)),
            *("--output_dir", str(out), "--save_model_dir", str(out / "final")),
            *("--dataset_text_field", "output", "--response_template", "\\n### Label:"),
            *("--num_train_epochs", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"),
            *("--use_flash_attn", "false", "--lora_dropout", "0.0"),
            *extra,
        ]
        code, model = run_keeping_model(monkeypatch, argv)
        return code, out, model

    return _train


def logits(model, ids=PROMPT) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def assert_loss_falls(out) -> None:
    losses = [r["value"] for r in read_training_logs(out)]
    assert len(losses) == 3 and losses[-1] < losses[0], losses


def base(tiny_model_dir, dtype=torch.bfloat16, rows=None):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    if rows:
        model.resize_token_embeddings(rows)
    return model


# --- flags, names, precision (fast) ---


def test_gpt_oss_lora_flags_parse_and_r_alias(tiny_model_dir):
    common = ["--model_name_or_path", "m", "--training_data_path", "d.json", "--output_dir", "o"]
    peft = parse_config(
        [*common, "--peft_method", "lora", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0"]
        + ["--target_modules", "all-linear"]
    ).peft
    assert (peft.peft_method, peft.lora_r, peft.lora_alpha, peft.lora_dropout) == ("lora", 8, 16, 0.0)
    assert peft.target_modules == ["all-linear"]
    assert parse_config([*common, "--r", "4"]).peft.lora_r == 4
    assert parse_config(common).peft.peft_method == "none"
    with pytest.raises(UserError, match="needs --alora_invocation_string"):
        parse_config([*common, "--peft_method", "alora"])
    with pytest.raises(UserError, match="invalid choice: 'qlora'"):
        parse_config([*common, "--peft_method", "qlora"])


def test_adapters_keep_the_frozen_base_in_half_precision(tiny_model_dir):
    args = ModelArgs(model_name_or_path=str(tiny_model_dir), torch_dtype="bfloat16")
    config = load_model_config(args)
    plan = precision_plan(args, config, "lora")
    assert (plan.load_dtype, plan.autocast, plan.save_dtype) == (
        torch.bfloat16,
        torch.bfloat16,
        torch.bfloat16,
    )
    full = precision_plan(args, config, "none")  # full fine-tuning: bf16 weights, Kahan-compensated updates
    assert (full.load_dtype, full.master_weights) == (torch.bfloat16, "kahan")


def test_all_linear_leaves_out_the_head_unless_named(tiny_model_dir):
    model = base(tiny_model_dir, torch.float32)
    assert resolve_target_modules(["all-linear"], model) == LINEAR
    assert resolve_target_modules(["all-linear", "lm_head"], model) == [*LINEAR, "lm_head"]
    assert resolve_target_modules(["q_proj", "v_proj"], model) == ["q_proj", "v_proj"]
    assert resolve_target_modules(None, model) is None


def test_bad_target_module_exits_1_listing_linear_names(train, capsys, tmp_path):
    (tmp_path / "out").mkdir()  # error.log goes only into a folder that exists (tuning/errors.py)
    code, out, _ = train("--peft_method", "lora", "--target_modules", "q_proj", "qkv_proj")
    assert code == 1
    line = (out / "error.log").read_text().strip()
    assert line.startswith("error: --target_modules qkv_proj matches no module of llama model ")
    assert line.endswith(
        "its linear modules are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj; "
        "pass some of those, or all-linear"
    )
    assert capsys.readouterr().err.splitlines()[-1] == line


# --- training runs (slow) ---


@pytest.mark.slow
def test_lora_q_v_trains_only_the_adapter_and_reloads(train, tiny_model_dir):
    code, out, model = train("--peft_method", "lora", "--target_modules", "q_proj", "v_proj")
    assert code == 0
    assert_loss_falls(out)
    final = out / "final"
    assert {
        p.name for p in final.iterdir()
    } == ADAPTER_FILES | TOKENIZER_FILES | CARD_FILES | SERVE_CHECK_FILES
    for checkpoint in out.glob("checkpoint-*"):  # adapter + trainer state, never base weights
        names = {p.name for p in checkpoint.iterdir()}
        assert names >= ADAPTER_FILES and not names & {"model.safetensors", "config.json"}, names
    saved = load_file(final / "adapter_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}  # the master weights, not a bf16 copy
    assert len(saved) == 8 and all(".lora_A." in k or ".lora_B." in k for k in saved)  # 2 layers x q,v x A,B
    assert set(json.loads((final / "adapter_config.json").read_text())["target_modules"]) == {
        "q_proj",
        "v_proj",
    }

    # frozen base: bfloat16 and bit-identical to the checkpoint; adapters: float32 master weights
    original = load_file(tiny_model_dir / "model.safetensors")
    frozen = {
        n.replace(".base_layer", ""): p
        for n, p in model.get_base_model().named_parameters()
        if "lora_" not in n
    }
    assert len(frozen) == len(original) == 21
    assert all(torch.equal(p, original[n].to(torch.bfloat16)) for n, p in frozen.items())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}

    trained = logits(model)
    reloaded = PeftModel.from_pretrained(base(tiny_model_dir), final)
    assert torch.allclose(logits(reloaded), trained, atol=1e-6)
    auto = AutoPeftModelForCausalLM.from_pretrained(final, dtype=torch.bfloat16)
    assert torch.allclose(logits(auto), trained, atol=1e-6)
    assert not torch.allclose(logits(base(tiny_model_dir)), trained, atol=1e-2)  # the adapter does something

    # resuming from the epoch-2 checkpoint ends on the same adapter, bit for bit
    resumed = out.parent / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-16", resumed / "checkpoint-16")
    shutil.move(out, out.parent / "first")
    shutil.move(resumed, out)
    assert train("--peft_method", "lora", "--target_modules", "q_proj", "v_proj")[0] == 0
    # the whole run's count: the checkpoint carried epochs 1-2's 848 (424 per epoch)
    assert json.loads((out / "run_summary.json").read_text())["trained_tokens"] == 3 * 424
    again = load_file(out / "final" / "adapter_model.safetensors")
    assert all(torch.equal(again[k], v) for k, v in saved.items())
    final = out.parent / "first" / "final"

    # merged (float32) logits = base + adapter (float32) logits
    assert merge.main(["--adapter", str(final), "--output", str(out / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in k for k in load_file(out / "merged" / "model.safetensors"))
    reference = PeftModel.from_pretrained(base(tiny_model_dir, torch.float32), final)
    assert (logits(merged) - logits(reference)).abs().max() < 1e-5


@pytest.mark.slow
def test_all_linear_with_gradient_checkpointing_trains_every_adapter(train):
    code, out, model = train(
        *("--peft_method", "lora", "--lora_r", "8", "--lora_alpha", "16", "--target_modules", "all-linear"),
        *("--gradient_checkpointing", "true"),
    )
    assert code == 0
    assert_loss_falls(out)
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == LINEAR and config["r"] == 8 and config["lora_alpha"] == 16
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 14  # 7 modules x 2 layers; B starts at zero, so nonzero means it got gradients
    assert all(p.abs().sum() > 0 for p in lora_b.values()), [n for n, p in lora_b.items() if not p.any()]


@pytest.mark.slow
def test_added_tokens_train_new_rows_and_reload(train, tiny_model_dir, tmp_path):
    rows = [{"output": f"### Text: {i}\n\n### Label: <|tool|> {o}"} for i, o in TWEETS] * 4
    data = write_json(tmp_path / "tool.json", rows)
    code, out, model = train(
        *("--peft_method", "lora", "--target_modules", "q_proj", "v_proj", "--torch_dtype", "float32"),
        *("--add_special_tokens", "<|tool|>", "--embedding_size_multiple_of", "8"),
        *("--save_new_embeddings_separately", "true"),
        data=data,
    )
    assert code == 0
    assert_loss_falls(out)
    final = out / "final"
    assert json.loads((final / "added_tokens_info.json").read_text()) == {
        "num_new_tokens": 1,
        "new_embedding_size": 368,
    }
    assert len(AutoTokenizer.from_pretrained(final)) == 363
    ids = torch.tensor([[1, 55, 72, 69, 82, 4, 362, 4, 80, 83]])
    trained = logits(model, ids)

    # a checkpoint holds the new rows inside the adapter (trainable tokens), never whole embeddings
    checkpoint = out / "checkpoint-24"
    keys = load_file(checkpoint / "adapter_model.safetensors")
    assert {tuple(v.shape) for k, v in keys.items() if "trainable_tokens" in k} == {(6, 32)}  # rows 362..367
    assert not any("base_layer" in k for k in keys)
    assert json.loads((checkpoint / "added_tokens_info.json").read_text())["new_embedding_size"] == 368
    assert torch.allclose(
        logits(PeftModel.from_pretrained(base(tiny_model_dir, torch.float32, 368), checkpoint), ids),
        trained,
        atol=1e-6,
    )

    # the final adapter has them split out for vLLM; copying them into the resized base gives the same model
    assert not any("trainable_tokens" in k for k in load_file(final / "adapter_model.safetensors"))
    new = load_file(final / "new_embeddings.safetensors")
    assert {k: tuple(v.shape) for k, v in new.items()} == {
        "input_embeddings": (6, 32),
        "output_embeddings": (6, 32),
    }
    resized = base(tiny_model_dir, torch.float32, 368)
    with torch.no_grad():
        resized.get_input_embeddings().weight[362:] = new["input_embeddings"]
        resized.get_output_embeddings().weight[362:] = new["output_embeddings"]
    assert torch.allclose(logits(PeftModel.from_pretrained(resized, final), ids), trained, atol=1e-6)
    assert merge.main(["--adapter", str(final), "--output", str(out / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == 368
    assert (logits(merged, ids) - trained).abs().max() < 1e-5


@pytest.mark.slow
def test_alora_run_reloads_with_its_invocation_tokens(train, tiny_model_dir):
    code, out, model = train(
        *("--peft_method", "alora", "--alora_invocation_string", "### Label:"),
        *("--target_modules", "q_proj", "v_proj"),
    )
    assert code == 0
    assert_loss_falls(out)
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["alora_invocation_tokens"] == [102, 4, 48, 69, 70, 73, 80, 30]
    trained = logits(model)
    reloaded = PeftModel.from_pretrained(base(tiny_model_dir), out / "final")
    assert torch.allclose(logits(reloaded), trained, atol=1e-6)
    # before the invocation the adapter is off: those positions match the base model exactly
    assert torch.allclose(trained[:, :6], logits(base(tiny_model_dir))[:, :6], atol=1e-6)
    assert merge.main(["--adapter", str(out / "final"), "--output", str(out / "merged")]) == 1


@pytest.mark.slow
def test_prompt_tuning_run_reloads(train, tiny_model_dir):
    code, out, model = train(
        *("--peft_method", "pt", "--num_virtual_tokens", "4"),
        *("--prompt_tuning_init", "TEXT", "--prompt_tuning_init_text", "Label:"),
    )
    assert code == 0
    assert_loss_falls(out)
    final = out / "final"
    assert {
        p.name for p in final.iterdir()
    } == ADAPTER_FILES | TOKENIZER_FILES | CARD_FILES | SERVE_CHECK_FILES
    assert {k: tuple(v.shape) for k, v in load_file(final / "adapter_model.safetensors").items()} == {
        "prompt_embeddings": (4, 32)
    }
    reloaded = PeftModel.from_pretrained(base(tiny_model_dir), final)
    assert torch.allclose(logits(reloaded), logits(model), atol=1e-6)
