"""Padding-free rows equal padded batches (no sample attends to another); token-budget batches; wrapped
packing (contamination-free packing: tests/test_packing.py)."""

from __future__ import annotations

import datasets
import pytest
import torch

from tests.conftest import loss_and_grads
from tuning.data.batching import TokenBudgetBatchSampler, pack_wrapped, sample_lengths
from tuning.data.collate import PaddingCollator, PaddingFreeCollator
from tuning.errors import UserError
from tuning.testing.tiny_model import build_model
from tuning.train.speed import choose_collator, padding_free_blocker

X = -100
FEATURES = [
    {"input_ids": [1, 5, 6, 7, 8, 9], "labels": [X, X, X, 7, 8, 9]},
    {"input_ids": [1, 10, 11, 12], "labels": [X, X, 11, 12]},
    {"input_ids": [1, 13, 14, 15, 16, 17, 18, 19], "labels": [X, X, X, X, X, 17, 18, 19]},
]


def test_one_row_positions_restart_and_boundaries_untrained():
    batch = PaddingFreeCollator()(FEATURES[:2])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8, 9, 1, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    # the first label of every sample is -100: the previous sample's last token predicts nothing
    assert batch["labels"].tolist() == [[X, X, X, 7, 8, 9, X, X, 11, 12]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_equals_padded_loss_and_gradients(tokenizer, attn):
    model = build_model(len(tokenizer), attn_implementation=attn)
    model.config.use_cache = False  # what the model stage sets
    padded_loss, padded_grads = loss_and_grads(model, PaddingCollator(pad_id=2)(FEATURES))
    free_loss, free_grads = loss_and_grads(model, PaddingFreeCollator()(FEATURES))
    assert torch.allclose(free_loss, padded_loss, atol=1e-5, rtol=0)
    assert torch.allclose(free_grads, padded_grads, atol=1e-5, rtol=0)


def test_with_a_cache_samples_would_attend_to_each_other(tokenizer):
    """Why padding-free needs use_cache=False: with a cache transformers drops the per-sample mask."""
    model = build_model(len(tokenizer))
    padded = model(**PaddingCollator(pad_id=2)(FEATURES), use_cache=False).loss
    leaky = model(**PaddingFreeCollator()(FEATURES), use_cache=True).loss
    assert abs(leaky.item() - padded.item()) > 1e-3
    model.config.use_cache = True
    assert padding_free_blocker(model) == "model.config.use_cache is true"
    assert isinstance(choose_collator(True, model, tokenizer), PaddingCollator)
    model.config.use_cache = False
    assert padding_free_blocker(model) is None
    assert isinstance(choose_collator(True, model, tokenizer), PaddingFreeCollator)
    assert isinstance(choose_collator(False, model, tokenizer), PaddingCollator)


def test_token_budget_batches_group_by_length_and_keep_the_budget():
    lengths = [5, 30, 6, 12, 29, 7, 13, 50]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=40, seed=0)
    # sorted by length 5 6 7 12 13 | 29 | 30 | 50 (over budget: alone)
    assert sorted(sampler.batches) == [[0, 2, 5, 3], [1], [4], [6], [7]]
    assert sampler.batches[0] == [0, 2, 5, 3]
    first, second = list(sampler), list(sampler)
    assert sorted(map(tuple, first)) == sorted(map(tuple, second)) and first != second  # reshuffled
    assert sorted(i for b in first for i in b) == list(range(8)) and len(sampler) == 5


def test_token_budget_counts_padding_when_padded():
    sampler = TokenBudgetBatchSampler([4, 4, 10, 10], max_tokens=20, padded=True)
    assert sampler.batches == [[0, 1], [2, 3]]  # [4, 4, 10] would cost 3 × 10 padded tokens
    with pytest.raises(UserError, match="max_tokens_per_batch"):
        TokenBudgetBatchSampler([1], max_tokens=0)


def test_wrapped_packing_and_lengths():
    ds = datasets.Dataset.from_dict(
        {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "labels": [[X, 2, 3], [X, 5], [X, 7, 8, 9]]}
    )
    packed = pack_wrapped(ds, block_size=4)
    assert packed["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert packed["labels"] == [[X, 2, 3, X], [5, X, 7, 8], [9]]
    assert sample_lengths(ds.select([2, 0])) == [4, 3]


def test_trainer_steps_follow_the_token_budget(tokenizer, tmp_path):
    from tuning.config.args import TrainArgs
    from tuning.data import DataStats, PreparedData
    from tuning.model.loading import PrecisionPlan
    from tuning.train.trainer import build_trainer

    data = PreparedData(datasets.Dataset.from_list(FEATURES * 2), None, "pretokenized", DataStats())
    args = TrainArgs(
        output_dir=str(tmp_path), max_tokens_per_batch=12, num_train_epochs=1, save_strategy="no",
        logging_strategy="no", report_to="none", use_cpu=True,
    )  # fmt: skip
    model = build_model(len(tokenizer))
    model.config.use_cache = False
    trainer = build_trainer(args, model, tokenizer, data, PrecisionPlan(torch.float32, None, torch.float32))
    batches = [b["input_ids"].shape for b in trainer.get_train_dataloader()]
    # lengths 4 4 6 6 8 8 → [4 4] [6 6] [8] [8]: one padding-free row each, never over 12 tokens
    assert sorted(batches) == [(1, 8), (1, 8), (1, 8), (1, 12)]
    assert trainer.train().global_step == 4


def test_a_model_whose_mask_ignores_position_ids_is_padded_instead(tokenizer):
    """GptOssModel (transformers 5.24) builds its eager/sdpa mask without position_ids: in one padding-free
    row the second sample attends to the first. The blocker must see that, and only for such models."""
    from tuning.testing.tiny_gpt_oss import build_gpt_oss

    model = build_gpt_oss(len(tokenizer), attn_implementation="eager")
    model.config.use_cache = False
    padded = model(**PaddingCollator(pad_id=2)(FEATURES)).loss
    leaky = model(**PaddingFreeCollator()(FEATURES)).loss
    assert abs(leaky.item() - padded.item()) > 1e-3  # the reason for the blocker, measured
    assert padding_free_blocker(model) == "GptOssModel builds its eager attention mask without position_ids"
    assert isinstance(choose_collator(True, model, tokenizer), PaddingCollator)
    llama = build_model(len(tokenizer), attn_implementation="eager")
    llama.config.use_cache = False
    assert padding_free_blocker(llama) is None  # Llama passes position_ids to its mask: exact (above)
