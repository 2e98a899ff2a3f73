"""Model stage: tokenizer and model loading, precision, attention, embeddings."""

from tuning.model.loading import (
    PrecisionPlan,
    context_length,
    load_model,
    load_model_config,
    precision_plan,
)
from tuning.model.tokenizer import generation_stop_ids, load_tokenizer

__all__ = [
    "PrecisionPlan",
    "context_length",
    "generation_stop_ids",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "precision_plan",
]
