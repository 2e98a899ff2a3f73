"""Data handlers for data configs: a registry of named functions, one module per family.

``register_handler`` adds your own; importing this package registers the built-in ones.
"""

from tuning.data.handlers import chat, columns, templates, tokenizing  # noqa: F401 (registers them)
from tuning.data.handlers.registry import HANDLERS, Handler, get_handler, register_handler, resolve_kwargs

__all__ = ["HANDLERS", "Handler", "get_handler", "register_handler", "resolve_kwargs"]
