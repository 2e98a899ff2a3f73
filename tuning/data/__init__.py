"""Data stage: paths → rows → (text, trained spans) → input_ids + labels → padded batches."""

from tuning.data.collate import PaddingCollator, pad_token_id
from tuning.data.pipeline import DataStats, PreparedData, build_datasets

__all__ = ["DataStats", "PaddingCollator", "PreparedData", "build_datasets", "pad_token_id"]
