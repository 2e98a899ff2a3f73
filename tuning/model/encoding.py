"""What the data stage encodes with, loaded the same way by every command that reads data (train, audit,
preview): the tokenizer, or for an image-text model its processor (whose tokenizer is the text's), the
model's config, the context length and the tokens that end a generated turn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuning.config import DataArgs, ModelArgs
from tuning.model.loading import context_length, load_model_config
from tuning.model.tokenizer import generation_stop_ids, load_tokenizer
from tuning.model.vision import is_image_text, load_processor


@dataclass(frozen=True)
class Encoding:
    model_config: Any
    tokenizer: Any
    processor: Any  # an image-text model's (docs/vision.md); None for a text model
    max_len: int  # --max_seq_length within the model's context
    stop_ids: tuple[int, ...]  # where a generated turn ends: chat turns are trained through the first


def load_encoding(model_args: ModelArgs, data_args: DataArgs) -> Encoding:
    tokenizer = load_tokenizer(model_args, data_args)  # first: its error names the tokenizer flag
    model_config = load_model_config(model_args)
    processor = load_processor(model_args, data_args) if is_image_text(model_config) else None
    if processor is not None:
        tokenizer = processor.tokenizer
    return Encoding(
        model_config,
        tokenizer,
        processor,
        context_length(model_config, data_args.max_seq_length),
        generation_stop_ids(model_args, model_config, tokenizer),
    )
