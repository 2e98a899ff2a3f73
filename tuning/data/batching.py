"""Which samples share a step: token-budget batches grouped by length, and packing into rows.

transformers has length-grouped samplers with a fixed number of samples per batch; none caps the
tokens per batch, which is what keeps the work (and memory) of every step alike when lengths vary.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import datasets

from tuning.data.tokenize import IGNORE_INDEX
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


PACKING_STRATEGIES = ("bfd", "wrapped")


def pack(dataset: datasets.Dataset, block_size: int, strategy: str = "bfd") -> datasets.Dataset:
    """Pack the training samples into rows of at most ``block_size`` tokens (``--packing_strategy``)."""
    if strategy == "bfd":
        return pack_best_fit(dataset, block_size)
    if strategy == "wrapped":
        return pack_wrapped(dataset, block_size)
    raise ValueError(f"unknown packing strategy {strategy!r}; expected one of {PACKING_STRATEGIES}")


def pack_best_fit(dataset: datasets.Dataset, block_size: int) -> datasets.Dataset:
    """Whole samples into rows of at most ``block_size`` tokens by best-fit decreasing (TRL's ``bfd``), each
    row carrying ``position_ids`` that restart at 0 for every sample.

    The padding-free collator keeps those positions, and transformers turns restarting positions into a
    block-diagonal mask (or flash-attention's varlen boundaries), so a sample never attends to another:
    a packed row computes what its samples would one by one. Every sample's first label is -100 (the
    token before it belongs to another sample); an unpacked sample's first label never carries loss
    either, since the model shifts labels by one. Samples are never cut: the data stage already
    truncated each one to ``max_seq_length``.
    """
    import numpy as np
    import pyarrow as pa

    lengths = sample_lengths(dataset)
    if lengths and max(lengths) > block_size:
        raise ValueError(f"a sample is longer than the packing row ({max(lengths)} > {block_size} tokens)")
    bins = best_fit_decreasing(lengths, block_size)
    order = [i for b in bins for i in b]
    table = dataset.select_columns(["input_ids", "labels"]).with_format("arrow")[:].take(order)
    ids, labels = (table[name].combine_chunks().flatten() for name in ("input_ids", "labels"))
    sizes = np.asarray([lengths[i] for i in order], dtype=np.int64)
    starts = np.cumsum(sizes) - sizes  # where each sample begins in the concatenated stream
    first_untrained = labels.to_numpy(zero_copy_only=False).copy()
    first_untrained[starts] = IGNORE_INDEX
    positions = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(starts, sizes)
    row_offsets = pa.array(np.cumsum([0] + [sum(lengths[i] for i in b) for b in bins]), type=pa.int32())
    columns = {
        "input_ids": ids,
        "labels": pa.array(first_untrained, type=labels.type),
        "position_ids": pa.array(positions, type=ids.type),
    }
    return datasets.Dataset(
        pa.table({k: pa.ListArray.from_arrays(row_offsets, v) for k, v in columns.items()})
    )


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` in bins of total at most ``capacity``: longest first, each into the open bin
    it fills most tightly (a new bin when none has room). Bins in the order they were opened.

    The open bins are indexed by their free space in a max segment tree over 1..capacity, so finding the
    tightest fit is O(log capacity): the leftmost leaf at or above the length (TRL finds it the same way).
    """
    size = 1 << max(capacity - 1, 0).bit_length()
    tree = [0] * (2 * size)  # leaf capacity-1 holds "free space capacity": a new bin, always available
    by_space: dict[int, deque[int]] = {}  # free space → the open bins with that much room, oldest first

    def update(space: int, present: bool) -> None:
        i = size + space - 1
        tree[i] = space if present else 0
        while i > 1:
            i >>= 1
            tree[i] = max(tree[2 * i], tree[2 * i + 1])

    def tightest(length: int) -> int:
        i = 1
        while i < size:
            i = 2 * i if tree[2 * i] >= length else 2 * i + 1
        return tree[i]

    update(capacity, True)
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = int(lengths[index])
        if length == 0:
            continue  # an empty sample trains nothing and has no place in a row
        space = tightest(length)
        if space < capacity:
            b = by_space[space].popleft()
            if not by_space[space]:
                update(space, False)
        else:
            b = len(bins)
            bins.append([])
            free.append(capacity)
        bins[b].append(index)
        free[b] -= length
        if 0 < free[b] < capacity:
            by_space.setdefault(free[b], deque()).append(b)
            update(free[b], True)
    return bins


def pack_wrapped(dataset: datasets.Dataset, block_size: int) -> datasets.Dataset:
    """Concatenate all samples and cut the stream into rows of ``block_size`` tokens (the last may be short).

    Pretraining-style packing (TRL's ``wrapped``): tokens attend across sample boundaries within a row,
    and a sample may be cut between two rows. Labels travel with their tokens, so masked positions stay
    masked.
    """

    def pack_chunk(batch: dict[str, list[Any]], carry: dict[str, list[int]]) -> dict[str, list[list[int]]]:
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
        packed = pack_chunk(chunk, carry)
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
