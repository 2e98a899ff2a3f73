"""Handlers that render a text column from a template: a row template, or the chat template alone."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from tuning.data import chat
from tuning.data.formats import RowTemplate, rows_of
from tuning.data.handlers.registry import register_handler
from tuning.errors import UserError


@lru_cache(maxsize=32)
def _compiled(template: str) -> RowTemplate:
    return RowTemplate(template, what="the handler's template")


@register_handler(aliases={"dataset_text_field": "formatted_text_column_name"})
@register_handler(
    "apply_custom_data_formatting_template", aliases={"dataset_text_field": "formatted_text_column_name"}
)
def apply_custom_jinja_template(
    batch: dict[str, list],
    *,
    tokenizer: Any,
    template: str,
    formatted_text_column_name: str = "formatted_text",
) -> dict[str, list]:
    """Render ``template`` (sandboxed Jinja: ``{{column}}``, ``{{eos_token}}`` and the tokenizer's other
    special tokens) into ``formatted_text_column_name``. A missing column is an error, not blank text."""
    compiled = _compiled(template)
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return {formatted_text_column_name: [compiled.render({**specials, **row}) for row in rows_of(batch)]}


def require_chat_template(tokenizer: Any, chat_template: str | None, handler: str) -> None:
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise UserError(
            f"handler {handler} needs a chat template and the tokenizer has none; set chat_template, "
            "chat_template_path or chat_template_base64 under dataprocessor"
        )


@register_handler(
    aliases={"conversation_column": "conversation_column_name"},
    columns=("conversation_column_name",),
)
def apply_tokenizer_chat_template(
    batch: dict[str, list],
    *,
    tokenizer: Any,
    chat_template: str | None,
    chat_settings: chat.ChatSettings,
    formatted_text_column_name: str = "formatted_chat_data",
    conversation_column_name: str | None = None,
) -> dict[str, list]:
    """Render each conversation with the chat template into a text column (no tokens, no masking).
    Without ``conversation_column_name`` the whole row is the template's ``messages``, as in the
    reference tool (its templates index ``messages['messages']``). A row's ``tools``, ``documents`` and
    ``chat_template_kwargs`` go to the template."""
    require_chat_template(tokenizer, chat_template, "apply_tokenizer_chat_template")
    template = chat.ChatTemplate(tokenizer, chat_template)
    texts = []
    for row in rows_of(batch):
        column = conversation_column_name
        messages = row if column is None else chat.normalize_messages(row[column], column)
        texts.append(template.render(messages, chat.conversation_from_row(row, [], chat_settings)))
    return {formatted_text_column_name: texts}
