"""Chat handler: render with the chat template, tokenize, train only on the assistant turns."""

from __future__ import annotations

import sys
from typing import Any

from tuning.data import formats
from tuning.data.handlers.registry import register_handler
from tuning.data.handlers.templates import require_chat_template
from tuning.data.tokenize import tokenize_batch


@register_handler(
    aliases={"conversation_column": "conversation_column_name"},
    ignored={
        "formatted_text_column_name": "this handler writes input_ids and labels, not a text column",
        "max_seq_length": "the job's --max_seq_length applies; samples are truncated (and counted) after "
        "the last handler",
    },
    columns=("conversation_column_name",),
)
def tokenize_and_apply_chat_template_with_masking(
    batch: dict[str, list],
    *,
    tokenizer: Any,
    chat_template: str | None,
    conversation_column_name: str = "messages",
) -> dict[str, list]:
    """Loss on each assistant turn including its end-of-turn token; system, user and tool turns masked.
    Works with ``{% generation %}`` templates and plain ones (see ``formats.chat_text_and_spans``). A
    row's ``tools`` and ``documents`` columns go to the template."""
    require_chat_template(tokenizer, chat_template, "tokenize_and_apply_chat_template_with_masking")
    conversations = batch[conversation_column_name]
    tools, documents = batch.get("tools"), batch.get("documents")
    texts, spans = [], []
    for i, conversation in enumerate(conversations):
        text, sample_spans = formats.chat_text_and_spans(
            conversation,
            tokenizer,
            chat_template,
            tools=tools[i] if tools else None,
            documents=documents[i] if documents else None,
        )
        texts.append(text)
        spans.append(sample_spans or [(0, 0)])  # no assistant turn: counted and dropped downstream
    # chat templates write their own BOS and end each assistant turn with their own end token
    out = tokenize_batch(
        tokenizer, texts, spans, max_len=sys.maxsize, add_special_tokens=False, append_eos=False
    )
    return {"input_ids": out["input_ids"], "labels": out["labels"]}
