"""A data config's processed datasets → one training set and one validation set: splits, then mixing."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import datasets

from tuning.config import DataArgs
from tuning.data.chat import ChatSettings
from tuning.data.config_datasets import ProcessedDataset, process_all
from tuning.data.data_config import DataConfig
from tuning.data.prepare import DataStats, PreparedData
from tuning.errors import UserError

logger = logging.getLogger(__name__)


def split_dataset(part: ProcessedDataset, seed: int) -> tuple[Any, Any]:
    """(train, validation) parts of one processed dataset by its ``split`` fractions (seeded shuffle);
    rows in neither fraction are left out."""
    split = part.config.split
    if not split:
        return part.dataset, None
    n = len(part.dataset)
    shuffled = part.dataset.shuffle(seed=seed)
    n_val = round(split.get("validation", 0) * n)
    n_train = min(round(split.get("train", 0) * n), n - n_val)
    validation = shuffled.select(range(n_val)) if n_val else None
    train = shuffled.select(range(n_val, n_val + n_train)) if n_train else None
    return train, validation


def mix(parts: list[tuple[Any, float | None]], config: DataConfig) -> Any:
    """Interleave train parts with their sampling ratios (seeded) or, without ratios, concatenate."""
    proc = config.dataprocessor
    parts = [(d, r) for d, r in parts if r is None or r > 0]
    aligned = align_features([d for d, _ in parts])
    parts = [(d, r) for d, (_, r) in zip(aligned, parts, strict=True)]
    if len(parts) == 1:
        return parts[0][0]
    if all(r is None for _, r in parts):
        return datasets.concatenate_datasets([d for d, _ in parts])
    total = sum(r for _, r in parts if r is not None)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        logger.warning("data config %s: sampling ratios sum to %g; normalised to 1", config.path, total)
    return datasets.interleave_datasets(
        [d for d, _ in parts],
        probabilities=[(r or 0) / total for _, r in parts],
        seed=proc.seed,
        stopping_strategy=proc.sampling_stopping_strategy,
    )


def align_features(parts: list[Any]) -> list[Any]:
    """Cast every part to the first one's features: ``datasets`` refuses to mix ``int32`` token lists
    from one file with ``int64`` ones from another, though they mean the same."""
    first = parts[0].features
    if first is None:
        return parts
    return [p if p.features is None or p.features == first else p.cast(first) for p in parts]


def _total_stats(parts: list[ProcessedDataset]) -> DataStats:
    total = DataStats()
    counters = [f.name for f in dataclasses.fields(DataStats) if f.type in ("int", int)]
    for p in parts:
        for name in counters:
            setattr(total, name, getattr(total, name) + getattr(p.stats, name))
        for reason, count in p.stats.dropped.items():
            total.dropped[reason] = total.dropped.get(reason, 0) + count
    return total


def build_from_data_config(
    args: DataArgs,
    tokenizer: Any,
    max_len: int,
    settings: ChatSettings | None = None,
    processor: Any = None,
) -> PreparedData:
    """The data stage for ``--data_config_path``: every dataset processed, split, mixed."""
    config, processed = process_all(args, tokenizer, max_len, settings, processor)
    train_parts, validation_parts = [], []
    for part in processed:
        train, validation = split_dataset(part, config.dataprocessor.seed)
        if train is not None and (not isinstance(train, datasets.Dataset) or len(train)):
            train_parts.append((train, part.config.sampling))
        if validation is not None:
            validation_parts.append(validation)
    if not train_parts or all(r == 0 for _, r in train_parts):
        raise UserError(
            f"data config {config.path}: no training rows are left after split; give at least one "
            "dataset a positive train fraction (or no split)"
        )
    validation = datasets.concatenate_datasets(align_features(validation_parts)) if validation_parts else None
    train = mix(train_parts, config)
    return PreparedData(train, validation, "data_config", _total_stats(processed))
