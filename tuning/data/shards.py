"""``--do_dataprocessing_only``: the processed sets written as parquet shards."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets

from tuning.config import DataArgs
from tuning.data.prepare import PreparedData
from tuning.errors import UserError

logger = logging.getLogger(__name__)


def write_processed(data: PreparedData, args: DataArgs, output_dir: str) -> dict[str, Any]:
    """``--do_dataprocessing_only``: the processed sets as parquet shards under ``output_dir/train`` and
    ``output_dir/validation``; ``--training_data_path output_dir/train`` trains from them."""
    if not isinstance(data.train, datasets.Dataset):
        raise UserError(
            "--do_dataprocessing_only writes row counts and shards; set streaming: false in the data config"
        )
    written: dict[str, Any] = {"rows": {}}
    for name, ds, shards in (
        ("train", data.train, args.num_train_dataset_shards),
        ("validation", data.validation, args.num_eval_dataset_shards),
    ):
        if ds is None:
            continue
        folder = Path(output_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        shards = max(1, min(shards, len(ds)))
        for i in range(shards):
            ds.shard(shards, i, contiguous=True).to_parquet(
                str(folder / f"{name}-{i:05d}-of-{shards:05d}.parquet")
            )
        written["rows"][name] = len(ds)
        logger.info("wrote %d %s rows as %d parquet shards to %s", len(ds), name, shards, folder)
    return written
