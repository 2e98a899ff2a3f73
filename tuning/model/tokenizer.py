"""Tokenizer loading, the only vocabulary change we ever make (tokens the user asked to add), and the
model's stop tokens (what ends a generated turn)."""

from __future__ import annotations

import logging
from typing import Any

from transformers import AutoTokenizer, GenerationConfig

from tuning.config import DataArgs, ModelArgs
from tuning.model.sources import check_source, model_source, source_error

logger = logging.getLogger(__name__)


def load_tokenizer(model_args: ModelArgs, data_args: DataArgs) -> Any:
    """Load the tokenizer; add ``--add_special_tokens`` (and nothing else: no pad token)."""
    name = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    flag = "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "--model_name_or_path"
    check_source(name, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_source(name), trust_remote_code=model_args.trust_remote_code
        )
    except (OSError, ValueError) as e:
        fix = "; pass a folder with tokenizer files or a Hub id via --tokenizer_name_or_path"
        raise source_error(name, flag, "a tokenizer", e, fix) from None
    if data_args.add_special_tokens:
        new = [t for t in data_args.add_special_tokens if t not in tokenizer.get_vocab()]
        added = tokenizer.add_special_tokens(
            {"additional_special_tokens": new}, replace_extra_special_tokens=False
        )
        logger.info("added %d special tokens to the tokenizer: %s", added, new)
    if tokenizer.eos_token_id is None:
        logger.warning("tokenizer %s has no EOS token: samples will not learn where to stop", name)
    return tokenizer


def generation_stop_ids(model_args: ModelArgs, model_config: Any, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a generated turn: the model's ``generation_config.eos_token_id`` (an id or a
    list: Llama 3.2 stops on three, gpt-oss on ``<|return|>`` and ``<|call|>``), else its config's, and
    the tokenizer's EOS. Chat masking trains each assistant turn through the first of them."""
    try:
        eos = GenerationConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
        ).eos_token_id
    except (OSError, ValueError):  # no generation_config.json
        eos = getattr(model_config, "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))
