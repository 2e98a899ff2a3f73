"""Data stage: paths → rows → (text, trained spans) → input_ids + labels → batches.

The surface the later stages and the commands use; everything else is this package's own.
"""

from tuning.data.audit import audit_table, check_gates, epochs_of
from tuning.data.batching import TokenBudgetBatchSampler, sample_lengths
from tuning.data.chat import SAMPLE_INFO, TOKEN_ROLES
from tuning.data.collate import PaddingCollator, PaddingFreeCollator, pad_token_id
from tuning.data.odm import ENTROPY_REWARDS, VALIDATION_REWARDS, OnlineMixingSampler
from tuning.data.pipeline import (
    ServingView,
    build_datasets,
    check_data_config,
    data_audit,
    data_sources,
    preview_parts,
    serving_view,
)
from tuning.data.prepare import DataStats, PreparedData
from tuning.data.shards import write_processed
from tuning.data.tokenize import IGNORE_INDEX, trained_pieces
from tuning.data.vision import IMAGES, VisionCollator, collapse_image_runs, image_markers, load_image

__all__ = [
    "ENTROPY_REWARDS",
    "IGNORE_INDEX",
    "IMAGES",
    "SAMPLE_INFO",
    "ServingView",
    "TOKEN_ROLES",
    "DataStats",
    "PaddingCollator",
    "OnlineMixingSampler",
    "PaddingFreeCollator",
    "PreparedData",
    "TokenBudgetBatchSampler",
    "VALIDATION_REWARDS",
    "VisionCollator",
    "audit_table",
    "build_datasets",
    "check_data_config",
    "check_gates",
    "data_audit",
    "epochs_of",
    "collapse_image_runs",
    "image_markers",
    "load_image",
    "data_sources",
    "pad_token_id",
    "preview_parts",
    "sample_lengths",
    "serving_view",
    "trained_pieces",
    "write_processed",
]
