"""The handler registry: a name → a small function with typed keyword arguments.

A handler is one of three kinds: ``map`` (a batch of rows → new columns), ``filter`` (a batch → one
keep/skip flag per row) or ``dataset`` (a whole dataset → a dataset, for column operations). Its
keyword arguments are the ones a data config may set; ``tokenizer`` and ``chat_template`` are filled in
by the pipeline. Register your own with :func:`register_handler` before the job starts.
"""

from __future__ import annotations

import inspect
import logging
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from tuning.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)

HandlerKind = Literal["map", "filter", "dataset"]
# Filled in by the pipeline, never by a config: the job's tokenizer, the data config's chat template and
# the job's chat settings (stop tokens, --train_on, template arguments: tuning.data.chat.ChatSettings).
CONTEXT_PARAMS = ("tokenizer", "chat_template", "chat_settings")
# What a handler registered with ``expands_rows`` returns besides its columns: the input row (index in the
# batch) of each output row, so the pipeline can repeat the columns it keeps.
SOURCE_ROWS = "_source_rows"


@dataclass(frozen=True)
class Handler:
    name: str
    fn: Callable[..., Any]
    kind: HandlerKind
    batched: bool
    params: dict[str, inspect.Parameter]
    hints: dict[str, Any]
    aliases: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    columns: tuple[str, ...] = ()
    expands_rows: bool = False

    @property
    def context(self) -> list[str]:
        return [p for p in CONTEXT_PARAMS if p in inspect.signature(self.fn).parameters]


HANDLERS: dict[str, Handler] = {}


def register_handler(
    name: str | None = None,
    *,
    kind: HandlerKind = "map",
    batched: bool = True,
    aliases: dict[str, str] | None = None,
    ignored: dict[str, str] | None = None,
    columns: tuple[str, ...] = (),
    expands_rows: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` under ``name`` (default: its own name).

    ``fn``'s first parameter receives the batch (``batched``), the row, or the dataset (``kind=
    "dataset"``); its keyword parameters, with type hints, are what a config's ``fn_kwargs`` may set.
    ``aliases`` maps old argument names to new ones (accepted with a deprecation warning), ``ignored``
    maps argument names the handler accepts but does not use to the reason (reported in a warning),
    ``columns`` names the parameters whose values are input column names (checked against the data).
    ``expands_rows``: a batched map handler whose output may have more (or fewer) rows than its input; it
    returns :data:`SOURCE_ROWS` too, and the pipeline repeats the input columns a step keeps.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = dict(list(inspect.signature(fn).parameters.items())[1:])
        user = {
            n: p
            for n, p in params.items()
            if n not in CONTEXT_PARAMS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        hints = typing.get_type_hints(fn)
        HANDLERS[name or fn.__name__] = Handler(
            name or fn.__name__,
            fn,
            kind,
            batched,
            user,
            hints,
            aliases or {},
            ignored or {},
            columns,
            expands_rows,
        )
        return fn

    return decorate


def expand_rows(fn: Callable[..., dict], keep: list[str], batch: dict[str, list], **kwargs: Any) -> dict:
    """Run an ``expands_rows`` handler on a batch and repeat the ``keep`` input columns for its rows."""
    out = fn(batch, **kwargs)
    rows = out.pop(SOURCE_ROWS)
    for column in keep:
        if column not in out:
            out[column] = [batch[column][i] for i in rows]
    return out


def get_handler(name: str, where: str) -> Handler:
    if name not in HANDLERS:
        raise UserError(
            f"{where}: unknown data handler '{name}'{did_you_mean(name, list(HANDLERS))}; "
            f"known handlers: {', '.join(sorted(HANDLERS))}"
        )
    return HANDLERS[name]


def resolve_kwargs(handler: Handler, given: dict[str, Any], where: str) -> dict[str, Any]:
    """A config's keyword arguments for ``handler``: aliases renamed (warned), ignored keys dropped
    (warned), unknown names, wrong types and missing required arguments rejected."""
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key in handler.ignored:
            logger.warning("%s: argument '%s' is ignored: %s", where, key, handler.ignored[key])
            continue
        if key in handler.aliases:
            new = handler.aliases[key]
            logger.warning("%s: argument '%s' is deprecated, use '%s'", where, key, new)
            key = new
        if key not in handler.params:
            raise UserError(
                f"{where}: handler '{handler.name}' takes no argument '{key}'"
                f"{did_you_mean(key, list(handler.params))}; it takes: {', '.join(handler.params) or 'none'}"
            )
        hint = handler.hints.get(key)
        if not type_matches(hint, value):
            raise UserError(
                f"{where}: argument '{key}' of handler '{handler.name}' must be {_hint_name(hint)}, "
                f"got {type(value).__name__} {value!r:.60}"
            )
        out[key] = value
    missing = [n for n, p in handler.params.items() if p.default is p.empty and n not in out]
    if missing:
        raise UserError(
            f"{where}: handler '{handler.name}' needs argument '{missing[0]}'; add it to fn_kwargs"
        )
    return out


def type_matches(hint: Any, value: Any) -> bool:
    """Whether a YAML/JSON value fits a simple type hint (str, int, float, bool, X | None, list, dict)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is None or hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(type_matches(a, value) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(type_matches(args[0] if args else Any, v) for v in value)
    if origin is dict:
        kt, vt = args or (Any, Any)
        return isinstance(value, dict) and all(
            type_matches(kt, k) and type_matches(vt, v) for k, v in value.items()
        )
    if hint in (int, float):  # YAML's true is not a number; an int is a fine float
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def input_columns(handler: Handler, kwargs: dict[str, Any]) -> list[str]:
    """The column names a handler will read, from its column-naming arguments."""
    names: list[str] = []
    for param in handler.columns:
        value = kwargs.get(param, handler.params[param].default if param in handler.params else None)
        if isinstance(value, str):
            names.append(value)
        elif isinstance(value, (list, dict)):
            names.extend(value)
    return names
