"""Chat handler: render with the chat template, tokenize, train each assistant turn as the model
generates it, in its inference context (the rule of :mod:`tuning.data.chat`)."""

from __future__ import annotations

import sys
from typing import Any

from tuning.data import chat
from tuning.data.formats import rows_of
from tuning.data.handlers.registry import SOURCE_ROWS, register_handler
from tuning.data.handlers.templates import require_chat_template


@register_handler(
    aliases={"conversation_column": "conversation_column_name"},
    ignored={
        "formatted_text_column_name": "this handler writes input_ids and labels, not a text column",
        "max_seq_length": "the job's --max_seq_length applies; samples are truncated (and counted) after "
        "the last handler",
    },
    columns=("conversation_column_name",),
    expands_rows=True,
)
def tokenize_and_apply_chat_template_with_masking(
    batch: dict[str, list],
    *,
    tokenizer: Any,
    chat_template: str | None,
    chat_settings: chat.ChatSettings,
    conversation_column_name: str = "messages",
) -> dict[str, list]:
    """Loss on each assistant turn, from its reasoning to its stop token; system, user and tool turns
    masked. A conversation whose template renders earlier turns differently once later turns follow
    becomes several rows (counted in the job's data line). Works with ``{% generation %}`` templates
    too. A row's ``tools``, ``documents`` and ``chat_template_kwargs`` go to the template."""
    require_chat_template(tokenizer, chat_template, "tokenize_and_apply_chat_template_with_masking")
    conversations = chat.conversations_from_rows(rows_of(batch), conversation_column_name, chat_settings)
    # no truncation here: the pipeline truncates (and counts) after the last handler
    out, rows = chat.encode_conversations(conversations, tokenizer, chat_template, chat_settings, sys.maxsize)
    return {
        "input_ids": out["input_ids"],
        "labels": out["labels"],
        chat.SAMPLE_INFO: out[chat.SAMPLE_INFO],
        chat.TOKEN_ROLES: out[chat.TOKEN_ROLES],
        SOURCE_ROWS: rows,
    }
