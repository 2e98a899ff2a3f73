"""The memory plan and the run decide the same way: which loss, padding-free or not, the chunk size, the
processes (tuning/model/decisions.py). A plan that counted another loss than the run allocates would let
``--memory_check error`` pass a run that then runs out of memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import text_rows, write_json
from tuning import sft_trainer
from tuning.config import parse_config
from tuning.model import (
    LossDecision,
    decide_loss,
    estimate,
    load_model_config,
    precision_plan,
    setup_for,
    topology_of,
)
from tuning.testing.tiny_model import build_tokenizer

_SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    head_dim=8,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    tie_word_embeddings=False,
)


def _write(out: Path, model_type: str, **extra) -> Path:
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **_SMALL, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).float().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decision-models")
    return {
        "llama": _write(root / "llama", "llama"),
        # outside the verified list: the run checks label-only on its first batch, the plan counts standard
        "helium": _write(root / "helium", "helium"),
        "mixtral": _write(
            root / "mixtral", "mixtral", num_local_experts=4, num_experts_per_tok=2, output_router_logits=True
        ),
    }


def test_decide_loss():
    assert decide_loss("auto", "llama", None) == LossDecision("label_only", False, "auto: llama is verified")
    assert decide_loss("auto", "helium", None).loss == "standard"
    assert decide_loss("auto", "helium", None).verify
    assert decide_loss("auto", "llama", "no head").loss == "standard"
    assert decide_loss("auto", "llama", None, label_smoothing_factor=0.1).loss == "standard"
    assert decide_loss("label_only", "helium", None) == LossDecision(
        "label_only", False, "asked for (architecture not verified)"
    )
    assert topology_of(2, fsdp=True).engine == "fsdp" and topology_of(2, fsdp=True).sharded
    assert topology_of(2, deepspeed=True).engine == "deepspeed"
    assert topology_of(2).engine == "ddp" and not topology_of(1, fsdp=True).sharded


def _plan(argv: list[str]):
    config = parse_config(argv)
    model_config = load_model_config(config.model)
    plan = precision_plan(config.model, model_config, config.peft.peft_method, config.train.optim_name)
    topology = topology_of(1)
    return estimate(setup_for(config, model_config, plan, topology, build_tokenizer(), 64))


def test_the_plan_counts_full_logits_where_the_run_trains_on_the_standard_loss(models, tmp_path):
    """The bug the shared decision fixes: an unverified architecture planned as label-only."""
    data = write_json(tmp_path / "d.json", text_rows(1))
    base = ["--training_data_path", str(data), "--output_dir", str(tmp_path / "o")]
    verified = _plan(["--model_name_or_path", str(models["llama"]), *base])
    unverified = _plan(["--model_name_or_path", str(models["helium"]), *base])
    assert verified.decisions["loss"] == "label_only" and unverified.decisions["loss"] == "standard"
    assert unverified.decisions["verify_loss"]
    # the same vocabulary and tokens: standard counts every position's logits (12 B per entry in float32
    # for the log-softmax, its gradient and the logits' gradient), label-only at most one chunk
    assert unverified.logits > verified.logits
    assert "label_only only after the first batch verifies it" in unverified.describe["logits"]


# model, flags: each a way the loss or the batches are decided differently
GRID = [
    ("llama", []),
    ("llama", ["--loss_implementation", "standard"]),
    ("llama", ["--padding_free", "false"]),
    ("llama", ["--label_smoothing_factor", "0.1"]),
    ("llama", ["--peft_method", "pt", "--num_virtual_tokens", "4"]),  # prompt tuning: no padding-free
    ("llama", ["--packing", "true"]),
    ("helium", []),
    ("helium", ["--loss_implementation", "label_only"]),
    ("mixtral", []),
]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "flags"), GRID, ids=[f"{m}{''.join(f)}" for m, f in GRID])
def test_plan_and_run_agree_on_every_decision(models, tmp_path, monkeypatch, model, flags):
    planned, built = {}, {}
    real_check, real_build = sft_trainer.check_memory, sft_trainer.build_trainer

    def check(setup, *args, **kwargs):
        planned.update(estimate(setup).decisions)
        return real_check(setup, *args, **kwargs)

    def build(*args, **kwargs):
        built["trainer"] = real_build(*args, **kwargs)
        return built["trainer"]

    monkeypatch.setattr(sft_trainer, "check_memory", check)
    monkeypatch.setattr(sft_trainer, "build_trainer", build)
    data = write_json(tmp_path / "d.json", text_rows(1))
    argv = [
        "--model_name_or_path",
        str(models[model]),
        "--training_data_path",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--dataset_text_field",
        "output",
        "--response_template",
        "\n### Label:",
        "--torch_dtype",
        "float32",
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--save_strategy",
        "no",
        *flags,
    ]
    assert sft_trainer.main(argv) == 0
    assert planned, "the run made no memory plan"
    assert built["trainer"].decisions == planned
    if planned["verify_loss"]:  # helium computes its logits as Llama does: the first batch confirms it
        assert built["trainer"].loss_implementation == "label_only"
