"""Rows → (text, trained character spans), one small function per data format.

The format is chosen explicitly (``--data_format``) or, with ``auto``, by one written rule
(:func:`resolve_format`, documented in docs/data.md). Nothing here tokenizes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from jinja2 import StrictUndefined, UndefinedError

from tuning.config import DataArgs
from tuning.data.sandbox import BoundedSandbox, template_errors
from tuning.data.tokenize import Span
from tuning.errors import UserError

DEFAULT_CONVERSATION_FIELD = "messages"


def resolve_format(args: DataArgs, columns: list[str]) -> str:
    """The data format for a dataset with ``columns``: flags first, then the columns."""
    fmt = args.data_format
    if fmt == "auto":
        if args.data_formatter_template:
            fmt = "template"
        elif args.dataset_text_field:
            fmt = "text"
        elif args.dataset_conversation_field:
            fmt = "chat"
        elif "input_ids" in columns:
            fmt = "pretokenized"
        elif DEFAULT_CONVERSATION_FIELD in columns:
            fmt = "chat"
        elif {"input", "output"} <= set(columns):
            fmt = "input_output"
        else:
            raise UserError(
                f"cannot tell how to train on columns {columns}: pass --dataset_text_field COLUMN, "
                "--data_formatter_template '...{{column}}...', or provide input/output, messages or "
                "input_ids columns"
            )
    _check_columns(fmt, args, columns)
    return fmt


def _check_columns(fmt: str, args: DataArgs, columns: list[str]) -> None:
    needed = {
        "text": [args.dataset_text_field],
        "pretokenized": ["input_ids"],
        "input_output": ["input", "output"],
        "chat": [args.dataset_conversation_field or DEFAULT_CONVERSATION_FIELD],
    }.get(fmt, [])
    for col in needed:
        if col not in columns:
            raise UserError(f"column '{col}' (needed for {fmt} data) is not in the data; columns: {columns}")


def response_spans(text: str, response: str | None, instruction: str | None) -> list[Span]:
    """Trained spans of a text: all of it without a response marker; else from the end of the first
    marker to the end, or, with an instruction marker, from each response to the next instruction."""
    if not response:
        return [(0, len(text))]
    spans: list[Span] = []
    pos = 0
    while (found := text.find(response, pos)) >= 0:
        start = found + len(response)
        end = text.find(instruction, start) if instruction else -1
        end = end if end >= 0 else len(text)
        spans.append((start, end))
        if not instruction:
            break
        pos = end
    return spans


def combine_input_output(source: str, target: str) -> tuple[str, Span]:
    """Input and output joined by one space unless either side already has whitespace at the seam.

    The joining space is trained with the output: at inference the prompt is the input alone, so the
    model must learn to produce it."""
    source, target = str(source), str(target)
    sep = "" if source.endswith((" ", "\n")) or target.startswith((" ", "\n")) or not source else " "
    text = source + sep + target
    return text, (len(source), len(text))


class RowTemplate:
    """``{{column}}`` placeholders rendered with sandboxed, strict Jinja; a missing column is an error.

    Columns whose names are not identifiers (``{{Tweet text}}``, accepted by the reference tool) are
    rewritten to ``{{ row["Tweet text"] }}`` before compiling. ``what`` names the template in errors.
    """

    def __init__(self, template: str, what: str = "--data_formatter_template") -> None:
        self.source = template
        self.what = what
        rewritten = re.sub(
            r"{{\s*([\w ]*?\w)\s*}}",
            lambda m: m.group(0) if m.group(1).isidentifier() else "{{ row[" + repr(m.group(1)) + "] }}",
            template,
        )
        with template_errors(what, compiling=True):
            self.template = BoundedSandbox(undefined=StrictUndefined).from_string(rewritten)

    def render(self, row: dict[str, Any]) -> str:
        with template_errors(self.what, row):
            try:
                return self.template.render(**row, row=row)
            except UndefinedError as e:
                raise UserError(
                    f"{self.what} refers to a missing column ({e.message}); available columns: {list(row)}"
                ) from None


# A chat template that marks assistant text itself ({% generation %} ... {% endgeneration %}) is trusted
# over prefix rendering: it is exact even for templates that rewrite earlier turns.
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def chat_text_and_spans(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    chat_template: str | None,
    *,
    tools: list | None = None,
    documents: list | None = None,
) -> tuple[str, list[Span]]:
    """Render a conversation with the chat template; the assistant turns (with their end-of-turn
    tokens) are the trained spans. ``tools`` and ``documents`` are passed to the template.

    With ``{% generation %}`` markers the template says which characters are assistant text. Otherwise
    spans come from rendering each prefix: a turn starts where the rendering with a generation prompt
    stops agreeing with the whole, and ends where the rendering up to that turn does. Working on
    characters, not token ids, keeps this right when the assistant header tokenizes differently in
    context. A template that rewrites earlier turns would mis-mask, so overlapping spans are an error.
    A template's failure (a sandbox refusal, its own ``raise_exception``) is a one-line user error."""
    with template_errors(CHAT_TEMPLATE, messages):
        return _chat_text_and_spans(messages, tokenizer, chat_template, tools, documents)


CHAT_TEMPLATE = "the chat template"


def _chat_text_and_spans(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    chat_template: str | None,
    tools: list | None,
    documents: list | None,
) -> tuple[str, list[Span]]:
    if not isinstance(messages, list) or not messages:
        raise UserError("a conversation is empty or not a list of {role, content} messages")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and _GENERATION_TAG.search(template):
        return _generation_spans(messages, tokenizer, template, tools, documents)

    render = _chat_renderer(tokenizer, template, tools, documents)
    full = render(messages)
    spans: list[Span] = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        start = _common_prefix_length(full, render(messages[:i], True))
        end = _common_prefix_length(full, render(messages[: i + 1]))
        content = msg.get("content")
        # a template that rewrites a turn once later turns follow (gpt-oss drops earlier reasoning) can
        # leave a span that misses the turn's own text: refuse rather than train on the wrong tokens
        lost = isinstance(content, str) and content.strip() not in full[start:end]
        if end <= start or lost or (spans and start < spans[-1][1]):
            raise UserError(
                "the chat template renders earlier turns differently once later turns follow, so "
                "assistant turns can't be located; pass a prefix-stable chat template or one that marks "
                "assistant text with {% generation %} ... {% endgeneration %}"
            )
        spans.append((start, end))
    return full, spans


def _chat_renderer(
    tokenizer: Any, template: Any, tools: list | None, documents: list | None
) -> Callable[..., str]:
    """``render(messages, generation_prompt=False)`` with the chat template.

    Masking renders every conversation 1 + 2 × (assistant turns) times, and ``apply_chat_template``
    spends ~4x the template's own time per call on checks, so a plain string template is rendered
    directly with the compiled template transformers itself caches and uses (same sandbox, globals and
    special-token variables)."""
    if template is None:
        raise UserError(
            f"chat data needs a chat template, and tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has "
            "none; pass --chat_template (a Jinja string) or use a tokenizer that ships one"
        )
    if not isinstance(template, str):  # a dict of named templates: the tokenizer picks one

        def via_tokenizer(msgs: list, generation_prompt: bool = False) -> str:
            return tokenizer.apply_chat_template(
                msgs,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                tools=tools,
                documents=documents,
            )

        return via_tokenizer
    from transformers.utils.chat_template_utils import _compile_jinja_template

    with template_errors(CHAT_TEMPLATE, compiling=True):
        compiled = _compile_jinja_template(template)
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}

    def direct(msgs: list, generation_prompt: bool = False) -> str:
        return compiled.render(
            messages=msgs,
            tools=tools,
            documents=documents,
            add_generation_prompt=generation_prompt,
            **specials,
        )

    return direct


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def _generation_spans(
    messages: list[dict[str, Any]], tokenizer: Any, template: str, tools: list | None, documents: list | None
) -> tuple[str, list[Span]]:
    # transformers computes the character spans of {% generation %} blocks while rendering (the same
    # machinery as return_assistant_tokens_mask); using them directly keeps our offset-based masking.
    from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

    with template_errors(CHAT_TEMPLATE, compiling=True):
        _compile_jinja_template(template)  # cached: render_jinja_template reuses it
    rendered, indices = render_jinja_template(
        conversations=[messages],
        tools=tools,
        documents=documents,
        chat_template=template,
        return_assistant_tokens_mask=True,
        **tokenizer.special_tokens_map,
    )
    return rendered[0], [(int(a), int(b)) for a, b in indices[0] if b > a]
