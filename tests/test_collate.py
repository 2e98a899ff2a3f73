"""Padding is masked by position, never by id: a pad id equal to EOS never hides a real EOS."""

from __future__ import annotations

import torch

from tuning.data.collate import PaddingCollator, pad_token_id

X = -100


def test_pads_right_and_masks_by_position():
    batch = PaddingCollator(pad_id=2)(
        [{"input_ids": [1, 5, 2], "labels": [X, 5, 2]}, {"input_ids": [1, 2], "labels": [X, 2]}]
    )
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 2], [1, 2, 2]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))
    # the second row's real EOS (position 1) stays trained though the pad id is also 2
    assert torch.equal(batch["labels"], torch.tensor([[X, 5, 2], [X, 2, X]]))


def test_pad_to_multiple_of():
    batch = PaddingCollator(pad_id=0, pad_to_multiple_of=4)(
        [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}]
    )
    assert batch["input_ids"].shape == (1, 8) and batch["attention_mask"].sum() == 5


def test_pad_id_without_pad_token_is_eos(tokenizer):
    assert tokenizer.pad_token is None
    assert pad_token_id(tokenizer) == tokenizer.eos_token_id == 2
