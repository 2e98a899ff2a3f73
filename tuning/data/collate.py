"""Batches of variable-length samples → padded tensors masked by position, or one padding-free row.

Padding is masked by position (attention mask 0, label -100), never by token id, so the pad id may
be any existing token (EOS when the tokenizer has no pad token) without ever masking a real EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from transformers import DataCollatorWithFlattening

from tuning.data.tokenize import IGNORE_INDEX


def pad_token_id(tokenizer: Any) -> int:
    """The id used to fill padding positions: the tokenizer's pad token, else EOS, else 0.

    We never add a pad token: it would grow the vocabulary and break adapters on the base model.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


@dataclass
class PaddingCollator:
    """Right-pads ``input_ids``/``labels`` to the longest sample (or a multiple of ``pad_to_multiple_of``)."""

    pad_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(features), longest), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), longest), dtype=torch.long),
            "labels": torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long),
        }
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
        return batch


class PaddingFreeCollator(DataCollatorWithFlattening):
    """Concatenates a batch into one row of shape ``[1, total_tokens]``, with no padding.

    ``position_ids`` restart at 0 for every sample and each sample's first label is -100, so no token
    predicts across a boundary. transformers turns restarting ``position_ids`` into a block-diagonal
    mask (sdpa/eager/flex, only when no KV cache is passed: the model stage sets ``use_cache=False``) or
    varlen boundaries (flash-attention), so samples never attend to each other. We reuse transformers'
    collator rather than writing our own; this subclass fixes the tensor type and keeps the per-sample
    ``position_ids`` of packed rows.
    """

    def __init__(self) -> None:
        # flash-attention derives its varlen boundaries from the restarting position_ids itself
        super().__init__(return_position_ids=True, return_tensors="pt")

    def __call__(self, features: list[dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        batch = super().__call__(features, *args, **kwargs)
        if features and "position_ids" in features[0]:
            # rows packed from several samples (--packing_strategy bfd) carry positions restarting per
            # sample; transformers' collator would number each row as one sample
            kept = [f["position_ids"] for f in features if len(f["input_ids"]) > 0]
            batch["position_ids"] = torch.tensor([list(chain.from_iterable(kept))], dtype=torch.long)
        return batch
