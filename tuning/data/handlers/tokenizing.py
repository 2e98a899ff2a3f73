"""Handlers that tokenize text columns: plain, and input/output with the input masked.

They do not truncate: the pipeline truncates every dataset to the job's ``max_seq_length`` after the
last handler, so truncated samples are counted in one place.
"""

from __future__ import annotations

import sys
from typing import Any

from tuning.data import formats
from tuning.data.handlers.registry import register_handler
from tuning.data.tokenize import encode, tokenize_batch


@register_handler(columns=("text_column_name",))
def tokenize(
    batch: dict[str, list],
    *,
    tokenizer: Any,
    text_column_name: str = "text",
    truncation: bool = False,
    max_length: int | None = None,
) -> dict[str, list]:
    """``text_column_name`` → ``input_ids`` and ``attention_mask`` (the tokenizer's special tokens added,
    but no second BOS on a text that starts with one)."""
    texts = [str(t) for t in batch[text_column_name]]
    enc = encode(tokenizer, texts, truncation=truncation, max_length=max_length)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@register_handler(columns=("input_column_name", "output_column_name"))
def tokenize_and_apply_input_masking(
    batch: dict[str, list],
    *,
    tokenizer: Any,
    input_column_name: str = "input",
    output_column_name: str = "output",
    add_eos_token: bool = True,
) -> dict[str, list]:
    """Input and output joined as in ``--data_format input_output``; loss on the output (and EOS)."""
    pairs = [
        formats.combine_input_output(i, o)
        for i, o in zip(batch[input_column_name], batch[output_column_name], strict=True)
    ]
    out = tokenize_batch(
        tokenizer,
        [t for t, _ in pairs],
        [[s] for _, s in pairs],
        max_len=sys.maxsize,
        append_eos=add_eos_token,
    )
    return {"input_ids": out["input_ids"], "labels": out["labels"]}
