"""Label-only chunked loss equals transformers' loss; trained-token normalisation across accumulation."""

from __future__ import annotations

import datasets
import pytest
import torch

from tuning.config.args import TrainArgs
from tuning.data import DataStats, PreparedData
from tuning.data.collate import PaddingCollator, PaddingFreeCollator
from tuning.errors import UserError
from tuning.model.loading import PrecisionPlan
from tuning.testing.tiny_model import build_model
from tuning.train.loss import (
    VERIFIED_ARCHITECTURES,
    chunked_cross_entropy,
    label_only_loss,
    resolve_loss_implementation,
)
from tuning.train.trainer import build_trainer

X = -100
FEATURES = [
    {"input_ids": [1, 5, 6, 7, 8, 9], "labels": [X, X, X, 7, 8, 9]},
    {"input_ids": [1, 10, 11, 12], "labels": [X, X, 11, 12]},
    {"input_ids": [1, 13, 14, 15, 16, 17, 18, 19], "labels": [X, X, X, X, X, 17, 18, 19]},
]


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("chunk_tokens", [1, 3, 2048])
@pytest.mark.parametrize("padding_free", [False, True])
def test_label_only_loss_equals_full_logits_loss(tokenizer, chunk_tokens, padding_free):
    model = build_model(len(tokenizer))
    model.config.use_cache = False
    batch = (PaddingFreeCollator() if padding_free else PaddingCollator(pad_id=2))(FEATURES)
    full = model(**batch).loss
    full.backward()
    full_grads = _grads(model)
    model.zero_grad()
    ours, outputs = label_only_loss(model, batch, chunk_tokens=chunk_tokens)
    ours.backward()
    assert outputs.logits.shape[-2] == 1  # the model itself projected only the last position
    assert torch.allclose(ours, full, atol=1e-6, rtol=0)
    assert torch.allclose(_grads(model), full_grads, atol=1e-6, rtol=0)


def test_normalised_by_num_items_in_batch():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 5, 8), torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[X, 3, X, 4, 5], [X, X, X, X, 1]])
    logits = head(hidden)[:, :-1].reshape(-1, 11)
    summed = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum")
    assert torch.allclose(chunked_cross_entropy(hidden, labels, head, num_items_in_batch=10), summed / 10)
    assert torch.allclose(chunked_cross_entropy(hidden, labels, head, chunk_tokens=2), summed / 4)
    nothing = chunked_cross_entropy(
        hidden.requires_grad_(), torch.full_like(labels, X), head, num_items_in_batch=4
    )
    assert nothing.item() == 0.0
    nothing.backward()  # a micro-batch without labels still takes part in the step
    assert hidden.grad.abs().sum().item() == 0.0


def test_auto_picks_label_only_unless_another_loss_applies(tokenizer):
    model = build_model(len(tokenizer))
    plain = TrainArgs(output_dir="unused", report_to="none")
    assert resolve_loss_implementation("auto", model, plain).loss == "label_only"
    assert resolve_loss_implementation("standard", model, plain).loss == "standard"
    liger = TrainArgs(output_dir="unused", report_to="none", use_liger_kernel=True)
    assert resolve_loss_implementation("auto", model, liger).loss == "standard"
    with pytest.raises(UserError, match="use_liger_kernel"):
        resolve_loss_implementation("label_only", model, liger)
    smoothing = TrainArgs(output_dir="unused", report_to="none", label_smoothing_factor=0.1)
    assert resolve_loss_implementation("auto", model, smoothing).loss == "standard"


def _one_step(tokenizer, tmp_path, batch_size, accumulation, loss_implementation, padding_free):
    """Parameters after one optimizer step over the same 8 samples."""
    rows = [
        {"input_ids": [1, *range(5, 5 + n)], "labels": [X] * (n + 1 - k) + list(range(5 + n - k, 5 + n))}
        for n, k in [(3, 1), (9, 7), (4, 2), (12, 1), (5, 5), (7, 3), (2, 1), (10, 6)]
    ]
    data = PreparedData(datasets.Dataset.from_list(rows), None, "pretokenized", DataStats())
    args = TrainArgs(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        loss_implementation=loss_implementation,
        padding_free=padding_free,
    )
    model = build_model(len(tokenizer))
    model.config.use_cache = False
    trainer = build_trainer(args, model, tokenizer, data, PrecisionPlan(torch.float32, None, torch.float32))
    trainer.train()
    assert trainer.loss_implementation == loss_implementation
    assert trainer.trained_tokens == 26
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize(("loss_implementation", "padding_free"), [("label_only", True), ("standard", False)])
def test_batch_1_accumulate_8_equals_batch_8(tokenizer, tmp_path, loss_implementation, padding_free):
    # samples train 1 to 7 tokens: a mean of per-batch means would weight them differently
    big = _one_step(tokenizer, tmp_path / "a", 8, 1, loss_implementation, padding_free)
    small = _one_step(tokenizer, tmp_path / "b", 1, 8, loss_implementation, padding_free)
    start = torch.cat([p.detach().flatten() for p in build_model(len(tokenizer)).parameters()])
    assert (big - start).abs().max() > 1e-3  # the step moved the weights
    assert torch.allclose(small, big, atol=1e-5, rtol=0)


# Small shapes every verified architecture accepts; token ids stay below vocab_size.
_SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    head_dim=8,
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
)
# Large enough to change the loss: a transform we forgot would show up as a difference.
_LOGIT_TRANSFORMS = {"logits_scaling": 4.0, "logit_scale": 0.25, "final_logit_softcapping": 3.0}


def _tiny_of_type(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **_SMALL)
    for key, value in _LOGIT_TRANSFORMS.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    model.config.use_cache = False
    with torch.no_grad():  # logits of a few units, where softcapping and scaling matter
        model.get_output_embeddings().weight.mul_(40.0)
    return model


@pytest.mark.parametrize("model_type", sorted(VERIFIED_ARCHITECTURES))
def test_every_verified_architecture_gets_its_own_loss_from_label_only(model_type):
    model = _tiny_of_type(model_type)
    for collator in (PaddingCollator(pad_id=2), PaddingFreeCollator()):
        batch = collator(FEATURES)
        full = model(**batch).loss
        ours, _ = label_only_loss(model, batch, chunk_tokens=3)
        assert torch.allclose(ours, full, rtol=1e-5, atol=1e-5), (model_type, type(collator).__name__)
    assert full.item() > 0.5  # a real loss, not a degenerate one


def test_auto_checks_an_unverified_architecture_before_using_label_only(caplog):
    model = _tiny_of_type("llama")
    plain = TrainArgs(output_dir="o", use_liger_kernel=False)
    model.config.model_type = "brand_new_arch"
    with caplog.at_level("INFO", logger="tuning"):
        decision = resolve_loss_implementation("auto", model, plain)
    assert (decision.loss, decision.verify) == ("standard", True)
    assert "brand_new_arch is not verified; checked on the first batch" in caplog.text
    asked = resolve_loss_implementation("label_only", model, plain)  # asked for: allowed, warned
    assert (asked.loss, asked.verify) == ("label_only", False)


def _first_step_loss(model, tmp_path, caplog):
    rows = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in FEATURES] * 2
    data = PreparedData(datasets.Dataset.from_list(rows), None, "pretokenized", DataStats())
    args = TrainArgs(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    with caplog.at_level("INFO", logger="tuning"):
        trainer = build_trainer(args, model, None, data, PrecisionPlan(torch.float32, None, torch.float32))
        trainer.train()
    return trainer


def test_first_batch_check_switches_to_label_only_only_when_the_losses_agree(tmp_path, caplog, monkeypatch):
    model = _tiny_of_type("gemma2")  # softcapped logits
    model.config.model_type = "brand_new_arch"
    trainer = _first_step_loss(model, tmp_path / "a", caplog)
    assert trainer.loss_implementation == "label_only"
    assert "loss: label_only (auto: brand_new_arch label-only equals the model's own loss" in caplog.text
    # an architecture doing something to its logits that the label-only loss does not copy
    caplog.clear()
    monkeypatch.setattr("tuning.train.loss._logit_transform", lambda config: None)
    model = _tiny_of_type("gemma2")
    model.config.model_type = "brand_new_arch"
    trainer = _first_step_loss(model, tmp_path / "b", caplog)
    assert trainer.loss_implementation == "standard"
    assert "loss: standard (auto: brand_new_arch label-only differs from the model's own loss" in caplog.text


_MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02),
    "qwen3_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, router_aux_loss_coef=0.3
    ),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.9, sliding_window=8),
}


@pytest.mark.parametrize("model_type", sorted(_MOE))
def test_moe_router_loss_added_as_the_model_adds_it(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **_SMALL, **_MOE[model_type], output_router_logits=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    model.config.use_cache = False
    plain = TrainArgs(output_dir="o", use_liger_kernel=False)
    assert resolve_loss_implementation("auto", model, plain).loss == "label_only"
    batch = PaddingCollator(pad_id=2)(FEATURES)
    full = model(**batch)
    assert full.aux_loss.item() > 0.1  # the router term is there and large enough to matter
    full.loss.backward()
    full_grads = _grads(model)
    model.zero_grad()
    ours, _ = label_only_loss(model, batch, chunk_tokens=3)
    ours.backward()
    assert torch.allclose(ours, full.loss, rtol=1e-5, atol=1e-6), model_type
    assert torch.allclose(_grads(model), full_grads, rtol=1e-4, atol=1e-6), model_type
    # normalised by the step's trained tokens, the router term added once per forward, unscaled
    ours_n, _ = label_only_loss(model, batch, num_items_in_batch=40)
    model_n = model(**batch, num_items_in_batch=40).loss
    assert torch.allclose(ours_n, model_n, rtol=1e-5, atol=1e-6), model_type
