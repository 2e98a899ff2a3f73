"""Jinja templates' sandbox: a size bound the sandbox lacks, and template failures as user errors.

A template (``--data_formatter_template``, a chat template, a data
handler's template) is the user's or the model's, and so is the data it renders.

Every template here runs in Jinja's sandbox, which refuses what could run code or read files: access to
``__class__``/``__mro__``/``__globals__`` (SecurityError), ``{% include %}``/``{% import %}``/``{% extends
%}`` (no loader), ``range()`` past 100000 items (OverflowError). Those are refusals, not crashes: one
line saying what was refused and that nothing ran. Any other exception raised by a template's own code
(a ZeroDivisionError, a ``raise_exception`` in a chat template) is the template's or the data's too.
Use :func:`template_errors` around compiling and rendering; :func:`template_failure` is the translation.

The sandbox blocks code, not size: ``{{ 'a' * 10**10 }}`` asks for 10 GB. :class:`BoundedBinops` refuses a
product or power past :data:`MAX_TEMPLATE_ITEMS` / :data:`MAX_TEMPLATE_BITS` the way the sandbox refuses a
huge ``range()``; mix it into any sandboxed environment (our row templates use :class:`BoundedSandbox`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from tuning.errors import UserError, excerpt, first_line

# A rendered row is the text of one sample: a repetition or power past these is a runaway template.
MAX_TEMPLATE_ITEMS = 10_000_000
MAX_TEMPLATE_BITS = 1_000_000


class BoundedBinops:
    """Mixin for a sandboxed Jinja environment: ``*`` and ``**`` refused (SecurityError) when the result
    would be huge. Intercepted operators are also never folded at compile time."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            items = (
                len(sized) * count if isinstance(sized, (str, list, tuple)) and isinstance(count, int) else 0
            )
            if items > MAX_TEMPLATE_ITEMS:
                raise SecurityError(f"a repetition of {items} items is too big")
        powers = operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1
        if powers and right * math.log2(abs(left)) > MAX_TEMPLATE_BITS:
            raise SecurityError(f"{left} ** {right} is too big")
        return super().call_binop(context, operator, left, right)  # type: ignore[misc]


class BoundedSandbox(BoundedBinops, SandboxedEnvironment):
    """Jinja's sandbox with the size bound."""


# where Jinja compiles a template given as a string: frames there are the template's own code
_TEMPLATE_FILENAME = "<template>"


def _raised_by_template(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            return True
        tb = tb.tb_next
    return False


def template_failure(
    e: Exception, what: str, row: Any = None, *, compiling: bool = False
) -> UserError | None:
    """The UserError for ``e``, raised while compiling or rendering ``what`` ("--data_formatter_template",
    "the chat template"), on ``row`` if given; None when the failure is not the template's (ours).
    ``compiling``: compiling depends on the template text alone, so any failure there is the template's
    (Jinja folds constant expressions then: ``{{ 7 ** 10**7 }}`` fails while compiling)."""
    if isinstance(e, UserError):
        return e
    on_row = f" on row {_row_excerpt(row)}" if row is not None else ""
    if isinstance(e, SecurityError):
        return UserError(
            f"refused: {what} tried something the template sandbox blocks ({first_line(e)}); no code ran. "
            "Templates may only format values: remove that part"
        )
    if isinstance(e, TemplateSyntaxError):
        return UserError(f"{what} is not valid Jinja: {e.message} (line {e.lineno}); fix the template")
    if isinstance(e, UndefinedError):
        return UserError(
            f"{what} uses an undefined value ({first_line(e)}){on_row}; fix the template or data"
        )
    if isinstance(e, TemplateError):  # raise_exception("...") in a chat template: it rejects the data
        return UserError(f"{what} refused the data{on_row}: {excerpt(first_line(e))}")
    if isinstance(e, MemoryError) or not (compiling or _raised_by_template(e)):
        return None
    if isinstance(e, TypeError) and "no loader" in str(e):
        return UserError(
            f"refused: {what} uses {{% include %}}, {{% import %}}, {{% extends %}} or {{% from %}}, which "
            "would read other files; nothing was read. Put the text in the template itself"
        )
    if isinstance(e, OverflowError) and "sandbox" in str(e).lower():
        return UserError(
            f"refused: {what} asks for a range() longer than the sandbox allows ({first_line(e)}); "
            "templates may only format values: loop over the data instead"
        )
    return UserError(
        f"{what} failed{on_row}: {type(e).__name__}: {excerpt(first_line(e))}; fix the template or the data"
    )


@contextlib.contextmanager
def template_errors(what: str, row: Any = None, *, compiling: bool = False) -> Iterator[None]:
    """Compile or render a template inside this: its failures leave as one-line user errors."""
    try:
        yield
    except Exception as e:
        translated = template_failure(e, what, row, compiling=compiling)
        if translated is None or translated is e:
            raise
        raise translated from None


def _row_excerpt(row: Any) -> str:
    try:
        text = json.dumps(row, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(row)
    return excerpt(text)
