"""Tokenizer loading and the only vocabulary change we ever make: tokens the user asked to add."""

from __future__ import annotations

import logging
from typing import Any

from transformers import AutoTokenizer

from tuning.config import DataArgs, ModelArgs
from tuning.errors import UserError, first_line

logger = logging.getLogger(__name__)


def load_tokenizer(model_args: ModelArgs, data_args: DataArgs) -> Any:
    """Load the tokenizer; add ``--add_special_tokens`` (and nothing else: no pad token)."""
    name = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a tokenizer from {name}: {first_line(e)}; pass a folder with "
            "tokenizer files or a hub id via --tokenizer_name_or_path"
        ) from None
    if data_args.chat_template:
        tokenizer.chat_template = data_args.chat_template
    if data_args.add_special_tokens:
        new = [t for t in data_args.add_special_tokens if t not in tokenizer.get_vocab()]
        added = tokenizer.add_special_tokens(
            {"additional_special_tokens": new}, replace_extra_special_tokens=False
        )
        logger.info("added %d special tokens to the tokenizer: %s", added, new)
    if tokenizer.eos_token_id is None:
        logger.warning("tokenizer %s has no EOS token: samples will not learn where to stop", name)
    return tokenizer
