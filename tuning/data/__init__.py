"""Data stage: paths → rows → (text, trained spans) → input_ids + labels → batches.

The surface the later stages and the commands use; everything else is this package's own.
"""

from tuning.data.batching import TokenBudgetBatchSampler, sample_lengths
from tuning.data.chat import SAMPLE_INFO
from tuning.data.collate import PaddingCollator, PaddingFreeCollator, pad_token_id
from tuning.data.pipeline import (
    ServingView,
    build_datasets,
    check_data_config,
    data_sources,
    preview_parts,
    serving_view,
)
from tuning.data.prepare import DataStats, PreparedData
from tuning.data.shards import write_processed
from tuning.data.tokenize import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "SAMPLE_INFO",
    "ServingView",
    "DataStats",
    "PaddingCollator",
    "PaddingFreeCollator",
    "PreparedData",
    "TokenBudgetBatchSampler",
    "build_datasets",
    "check_data_config",
    "data_sources",
    "pad_token_id",
    "preview_parts",
    "sample_lengths",
    "serving_view",
    "write_processed",
]
