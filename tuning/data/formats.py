"""Rows → (text, trained character spans), one small function per data format.

The format is chosen explicitly (``--data_format``) or, with ``auto``, by one written rule
(:func:`resolve_format`, documented in docs/data.md). Nothing here tokenizes.
"""

from __future__ import annotations

import re
from typing import Any

from jinja2 import StrictUndefined, UndefinedError

from tuning.config import DataArgs
from tuning.data.sandbox import BoundedSandbox, template_errors
from tuning.data.tokenize import Span
from tuning.errors import UserError, excerpt

DEFAULT_CONVERSATION_FIELD = "messages"
# Columns holding a conversation, in the order they are looked for (``conversations``: ShareGPT and TRL).
CONVERSATION_COLUMNS = (DEFAULT_CONVERSATION_FIELD, "conversations")
DEFAULT_TEXT_FIELD = "text"  # TRL's dataset_text_field default


def rows_of(batch: dict[str, list]) -> list[dict[str, Any]]:
    """A ``datasets`` batch (columns of lists) as a list of rows."""
    n = len(next(iter(batch.values()), []))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def resolve_format(args: DataArgs, columns: list[str]) -> str:
    """The data format for a dataset with ``columns``: flags first, then the columns, first match wins
    (the rule as written in docs/data.md, "Formats and the rule that picks one")."""
    fmt = args.data_format
    present = set(columns)
    if fmt == "auto":
        if args.data_formatter_template:
            fmt = "template"
        elif args.dataset_image_field:  # fms: --dataset_text_field then names the messages column
            fmt = "chat"
        elif args.dataset_text_field:
            fmt = "text"
        elif args.dataset_conversation_field:
            fmt = "chat"
        elif "input_ids" in present:
            fmt = "pretokenized"
        elif present & set(CONVERSATION_COLUMNS):
            fmt = "chat"
        elif {"prompt", "completion"} <= present:
            fmt = "prompt_completion"
        elif {"instruction", "output"} <= present:
            fmt = "alpaca"
        elif {"input", "output"} <= present:
            fmt = "input_output"
        elif DEFAULT_TEXT_FIELD in present:
            fmt = "text"
        else:
            raise UserError(
                f"cannot tell how to train on columns {columns}: provide messages/conversations, "
                "prompt+completion, instruction+output (alpaca), input+output, text or input_ids columns, "
                "or pass --dataset_text_field COLUMN or --data_formatter_template '...{{column}}...'"
            )
    _check_columns(fmt, args, columns)
    return fmt


def conversation_column(args: DataArgs, columns: list[str]) -> str:
    """The column chat rows are read from: the flag's, else the first of :data:`CONVERSATION_COLUMNS`."""
    if args.dataset_conversation_field:
        return args.dataset_conversation_field
    if args.dataset_image_field and args.dataset_text_field:  # fms-hf-tuning's image+text rows
        return args.dataset_text_field
    return next((c for c in CONVERSATION_COLUMNS if c in columns), DEFAULT_CONVERSATION_FIELD)


def _check_columns(fmt: str, args: DataArgs, columns: list[str]) -> None:
    needed = {
        "text": [args.dataset_text_field or DEFAULT_TEXT_FIELD],
        "pretokenized": ["input_ids"],
        "input_output": ["input", "output"],
        "prompt_completion": ["prompt", "completion"],
        "alpaca": ["instruction", "output"],
        "chat": [conversation_column(args, columns)],
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


ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(row: dict[str, Any]) -> str:
    """The Stanford Alpaca prompt of a row (used when the tokenizer has no chat template)."""
    source = row.get("input")
    template = ALPACA_PROMPT if source else ALPACA_PROMPT_NO_INPUT
    return template.format(
        instruction=require_text(row.get("instruction"), "instruction"), input=source or ""
    )


def alpaca_user_message(row: dict[str, Any]) -> str:
    """The user's turn of an alpaca row rendered as chat: the instruction, then the input if any."""
    source = row.get("input")
    instruction = require_text(row.get("instruction"), "instruction")
    return f"{instruction}\n\n{source}" if source else instruction


def prompt_completion_text(prompt: Any, completion: Any) -> tuple[str, Span]:
    """A text prompt and completion joined as they are (TRL's prompt-completion): the completion trained."""
    hint = " (or, for chat, prompt and completion must both be lists of messages)"
    prompt, completion = require_text(prompt, "prompt", hint), require_text(completion, "completion", hint)
    return prompt + completion, (len(prompt), len(prompt) + len(completion))


def require_text(value: Any, column: str, hint: str = "") -> str:
    if not isinstance(value, str):
        raise UserError(
            f"column '{column}' must hold text{hint}, found {type(value).__name__}: {excerpt(value)}"
        )
    return value


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
                # element: fms-hf-tuning's name for the row ({{ element["text"] }}); a column wins a clash
                return self.template.render(**{"row": row, "element": row, **row})
            except UndefinedError as e:
                raise UserError(
                    f"{self.what} refers to a missing column ({e.message}); available columns: {list(row)}"
                ) from None


# --- a batch of text-format rows ------------------------------------------------------------------


def render_batch(batch: dict[str, list], fmt: str, args: DataArgs) -> tuple[list[str], list[list[Span]]]:
    """Rows of one text-format batch → texts and their trained spans (an empty list: marker not found),
    after ``--train_on``: ``last_response`` keeps the last span, ``all`` trains the whole text."""
    rows = rows_of(batch)
    if fmt in ("input_output", "prompt_completion", "alpaca"):
        if fmt == "input_output":
            pairs = [combine_input_output(r["input"], r["output"]) for r in rows]
        elif fmt == "prompt_completion":
            pairs = [prompt_completion_text(r["prompt"], r["completion"]) for r in rows]
        else:
            pairs = [prompt_completion_text(alpaca_prompt(r), r["output"]) for r in rows]
        texts, spans = [t for t, _ in pairs], [[s] for _, s in pairs]
    else:
        if fmt == "template":
            template = RowTemplate(args.data_formatter_template or "")
            texts = [template.render(r) for r in rows]
        else:
            column = args.dataset_text_field or DEFAULT_TEXT_FIELD
            texts = [require_text(r[column], column) for r in rows]
        spans = [response_spans(t, args.response_template, args.instruction_template) for t in texts]
    if args.train_on == "all":
        return texts, [[(0, len(t))] for t in texts]
    if args.train_on == "last_response":
        return texts, [s[-1:] for s in spans]
    return texts, spans
