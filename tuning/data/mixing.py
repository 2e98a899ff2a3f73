"""A data config's processed datasets → one training set and one validation set: splits, then mixing."""

from __future__ import annotations

import logging
import math
from typing import Any

import datasets
import numpy as np

from tuning.data.audit import AuditSource
from tuning.data.config_datasets import ProcessedDataset, process_all
from tuning.data.data_config import DataConfig
from tuning.data.odm import MixingPlan
from tuning.data.prepare import EncodingContext, PreparedData, total_stats
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


SOURCE_COLUMN = "_audit_source"


def _mix_counted(parts: list[tuple[Any, float | None]], config: DataConfig) -> tuple[Any, list[int | None]]:
    """The mixed training set, and how many of each part's samples one pass over it draws (interleaving
    with ratios repeats or skips samples: the effective epochs the audit reports)."""
    sized = all(isinstance(d, datasets.Dataset) for d, _ in parts)
    if not sized:
        return mix(parts, config), [None] * len(parts)
    if all(r is None for _, r in parts) or len(parts) == 1:
        return mix(parts, config), [len(d) if r is None or r > 0 else 0 for d, r in parts]
    tagged = [
        (d.add_column(SOURCE_COLUMN, np.full(len(d), i, dtype=np.int32)), r) for i, (d, r) in enumerate(parts)
    ]
    mixed = mix(tagged, config)
    drawn = np.bincount(np.asarray(mixed.with_format("numpy")[SOURCE_COLUMN]), minlength=len(parts))
    return mixed.remove_columns(SOURCE_COLUMN), [int(n) for n in drawn]


def build_from_data_config(ctx: EncodingContext) -> PreparedData:
    """The data stage for ``--data_config_path``: every dataset processed, split, mixed."""
    config, processed = process_all(ctx)
    train_parts, validation_parts, sources, trained_sources = [], [], [], []
    validation_by_name: dict[str, Any] = {}
    for part in processed:
        train, validation = split_dataset(part, config.dataprocessor.seed)
        split = "+".join(n for n, d in (("train", train), ("validation", validation)) if d is not None)
        source = AuditSource(part.name, part.data_format, part.stats, split=split or "none")
        sources.append(source)
        if train is not None and (not isinstance(train, datasets.Dataset) or len(train)):
            train_parts.append((train, part.config.sampling))
            trained_sources.append(source)
            source.train_samples = len(train) if isinstance(train, datasets.Dataset) else None
        if validation is not None:
            validation_parts.append(validation)
            validation_by_name[part.name] = validation
    if not train_parts or all(r == 0 for _, r in train_parts):
        raise UserError(
            f"data config {config.path}: no training rows are left after split; give at least one "
            "dataset a positive train fraction (or no split)"
        )
    validation = datasets.concatenate_datasets(align_features(validation_parts)) if validation_parts else None
    if config.odm is not None:
        train, plan = _online_mixing(validation_by_name, train_parts, trained_sources, config)
        data = PreparedData(
            train, validation, "data_config", total_stats([p.stats for p in processed]), sources
        )
        data.online_mixing = plan
        return data
    train, drawn = _mix_counted(train_parts, config)
    for source, n in zip(trained_sources, drawn, strict=True):
        source.drawn_per_pass = n
    stats = total_stats([p.stats for p in processed])
    return PreparedData(train, validation, "data_config", stats, sources)


def _online_mixing(
    validation_by_name: dict[str, Any],
    train_parts: list[tuple[Any, float | None]],
    trained_sources: list[AuditSource],
    config: DataConfig,
) -> tuple[Any, MixingPlan]:
    """The training datasets concatenated in name order (fms numbers its arms by sorted name), and the
    plan the sampler draws from; each dataset's ``sampling`` is its starting weight (fms: equal)."""
    by_name = {s.name: (d, r) for s, (d, r) in zip(trained_sources, train_parts, strict=True) if r != 0}
    names = sorted(by_name)
    if len(names) < 2:
        raise UserError(
            f"data config {config.path}: online data mixing needs at least two datasets with training rows"
        )
    parts = align_features([by_name[n][0] for n in names])
    lengths = [len(d) for d in parts]
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    weights = [by_name[n][1] if by_name[n][1] is not None else 1.0 for n in names]
    plan = MixingPlan(
        config.odm, names, offsets, lengths, weights, config.dataprocessor.seed, validation_by_name
    )
    return datasets.concatenate_datasets(parts), plan
