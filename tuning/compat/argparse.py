"""argparse's private names (the standard library's, 3.10+), each pinned by ``tests/test_compat.py``.

``HfArgumentParser`` is an ``argparse.ArgumentParser``: reading the flags it declared and converting a
value the way the command line would are not public in argparse."""

from __future__ import annotations

import argparse
from typing import Any


def actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action (flag) the parser declares, in order (``parser._actions``)."""
    return list(parser._actions)


def convert(parser: argparse.ArgumentParser, action: argparse.Action, text: str) -> Any:
    """``text`` converted and checked as the parser converts a flag's value (its ``type`` and
    ``choices``); raises ``argparse.ArgumentError`` as it would (``_get_value``, ``_check_value``)."""
    value = parser._get_value(action, text)
    parser._check_value(action, value)
    return value


def is_store_false(action: argparse.Action) -> bool:
    """Whether ``action`` stores False when given (``--no_X``: ``argparse._StoreFalseAction``)."""
    return isinstance(action, argparse._StoreFalseAction)


def put_group_first(parser: argparse.ArgumentParser, group: Any, others_title: str) -> None:
    """List ``group`` (the last one added) first in ``--help``, and retitle the default group of flags:
    argparse prints ``parser._action_groups`` in order, and the default group is ``parser._optionals``."""
    parser._action_groups.remove(group)
    parser._action_groups.insert(0, group)
    parser._optionals.title = others_title


def action_groups(parser: argparse.ArgumentParser) -> list[Any]:
    """The groups ``--help`` prints, in its order (``parser._action_groups``); the first two are
    argparse's own (positional arguments, options)."""
    return list(parser._action_groups)


def group_actions(group: Any) -> list[argparse.Action]:
    """The flags of one group (``group._group_actions``)."""
    return list(group._group_actions)


def is_help(action: argparse.Action) -> bool:
    """Whether ``action`` is ``-h/--help`` (``argparse._HelpAction``)."""
    return isinstance(action, argparse._HelpAction)
