"""Batches of variable-length samples → padded tensors, masked by position.

Padding is masked by position (attention mask 0, label -100), never by token id, so the pad id may
be any existing token (EOS when the tokenizer has no pad token) without ever masking a real EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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
