"""Which samples share a step: token-budget batches grouped by length, and fixed-length packing.

transformers has length-grouped samplers with a fixed number of samples per batch; none caps the
tokens per batch, which is what keeps the work (and memory) of every step alike when lengths vary.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import datasets

from tuning.errors import UserError


class TokenBudgetBatchSampler:
    """Batches of sample indices whose token cost stays within ``max_tokens``.

    Samples are sorted by length (ties broken by a seeded shuffle) and cut greedily into batches, so
    each batch holds samples of similar length; the order of the batches is reshuffled every epoch.
    The composition of the batches is fixed at construction, so ``len`` (the Trainer's step count) is
    exact. Cost is the sum of lengths when padding-free, else ``longest × count`` (what padding costs).
    A sample longer than the budget gets a batch of its own.
    """

    def __init__(
        self, lengths: Sequence[int], max_tokens: int, *, padded: bool = False, seed: int = 0
    ) -> None:
        if max_tokens < 1:
            raise UserError(f"--max_tokens_per_batch must be positive, got {max_tokens}; pass e.g. 8192")
        self.max_tokens = max_tokens
        self.seed = seed
        self.epoch = 0
        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)
        order.sort(key=lambda i: lengths[i])  # stable: equal lengths keep the shuffled order
        self.batches = _cut(order, lengths, max_tokens, padded)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        # the epoch also advances on its own, because a distributed wrapper may not forward set_epoch
        order = list(range(len(self.batches)))
        random.Random(self.seed + self.epoch).shuffle(order)
        self.epoch += 1
        for i in order:
            yield self.batches[i]


def _cut(order: list[int], lengths: Sequence[int], max_tokens: int, padded: bool) -> list[list[int]]:
    batches: list[list[int]] = []
    current: list[int] = []
    cost = longest = 0
    for i in order:
        n = lengths[i]
        new_cost = max(longest, n) * (len(current) + 1) if padded else cost + n
        if current and new_cost > max_tokens:
            batches.append(current)
            current, cost, longest = [], 0, 0
            new_cost = n
        current.append(i)
        cost, longest = new_cost, max(longest, n)
    if current:
        batches.append(current)
    return batches


def pack_fixed_length(dataset: datasets.Dataset, block_size: int) -> datasets.Dataset:
    """Concatenate all samples and cut the stream into rows of ``block_size`` tokens (the last may be short).

    This is pretraining-style packing: tokens attend across sample boundaries within a row. Labels
    travel with their tokens, so masked positions stay masked.
    """

    def pack(batch: dict[str, list[Any]], carry: dict[str, list[int]]) -> dict[str, list[list[int]]]:
        ids = carry["input_ids"] + [t for row in batch["input_ids"] for t in row]
        labels = carry["labels"] + [t for row in batch["labels"] for t in row]
        full = len(ids) // block_size * block_size
        carry["input_ids"], carry["labels"] = ids[full:], labels[full:]
        return {
            "input_ids": [ids[i : i + block_size] for i in range(0, full, block_size)],
            "labels": [labels[i : i + block_size] for i in range(0, full, block_size)],
        }

    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    carry: dict[str, list[int]] = {"input_ids": [], "labels": []}
    for chunk in dataset.select_columns(["input_ids", "labels"]).iter(batch_size=1000):
        packed = pack(chunk, carry)
        rows["input_ids"] += packed["input_ids"]
        rows["labels"] += packed["labels"]
    if carry["input_ids"]:
        rows["input_ids"].append(carry["input_ids"])
        rows["labels"].append(carry["labels"])
    return datasets.Dataset.from_dict(rows)


def sample_lengths(dataset: datasets.Dataset) -> list[int]:
    """Token count of every row, read from Arrow without materialising the ids in Python."""
    import pyarrow.compute as pc

    lengths: list[int] = []
    for batch in dataset.with_format("arrow").iter(batch_size=10_000):
        lengths += pc.list_value_length(batch["input_ids"]).to_pylist()
    return lengths
