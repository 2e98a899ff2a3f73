"""Handlers that render a text column from a template: a row template, or the chat template alone."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from tuning.data.formats import CHAT_TEMPLATE, RowTemplate
from tuning.data.handlers.registry import register_handler
from tuning.data.sandbox import template_errors
from tuning.errors import UserError


@lru_cache(maxsize=32)
def _compiled(template: str) -> RowTemplate:
    return RowTemplate(template, what="the handler's template")


def _rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    n = len(next(iter(batch.values()), []))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


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
    return {formatted_text_column_name: [compiled.render({**specials, **row}) for row in _rows(batch)]}


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
    formatted_text_column_name: str = "formatted_chat_data",
    conversation_column_name: str | None = None,
) -> dict[str, list]:
    """Render each conversation with the chat template into a text column (no tokens, no masking).
    Without ``conversation_column_name`` the whole row is the template's ``messages``, as in the
    reference tool. A row's ``tools`` and ``documents`` go to the template."""
    require_chat_template(tokenizer, chat_template, "apply_tokenizer_chat_template")
    texts = []
    for row in _rows(batch):
        tools, documents = row.get("tools"), row.get("documents")
        with template_errors(CHAT_TEMPLATE, row):
            if conversation_column_name is None:
                texts.append(_render_row(row, tokenizer, chat_template, tools, documents))
                continue
            texts.append(
                tokenizer.apply_chat_template(
                    row[conversation_column_name],
                    tokenize=False,
                    chat_template=chat_template,
                    tools=tools,
                    documents=documents,
                )
            )
    return {formatted_text_column_name: texts}


def _render_row(
    row: dict[str, Any], tokenizer: Any, chat_template: str | None, tools: Any, documents: Any
) -> str:
    # transformers' apply_chat_template insists on a list of messages; a whole row (a mapping) is what
    # the reference tool's templates index (messages['messages']), so render with the same compiled,
    # sandboxed Jinja environment transformers uses, directly.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    with template_errors(CHAT_TEMPLATE, compiling=True):
        template = _compile_jinja_template(chat_template or tokenizer.chat_template)
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return template.render(
        messages=row, tools=tools, documents=documents, add_generation_prompt=False, **specials
    )
