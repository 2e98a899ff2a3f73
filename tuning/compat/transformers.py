"""transformers' private names (5.x), each pinned by ``tests/test_compat.py``."""

from __future__ import annotations

import inspect
from typing import Any


def compile_jinja_template(template: str) -> Any:
    """The compiled (and cached) Jinja template transformers renders chat templates with, in its own
    sandboxed environment with its extensions (``{% generation %}``) and filters: rendering through it
    is what ``apply_chat_template`` does, which our renderer must match exactly."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


def attn_implementation(config: Any) -> str:
    """The attention implementation a loaded model runs (``config._attn_implementation``; the public
    ``attn_implementation`` argument only sets it)."""
    return str(getattr(config, "_attn_implementation", "") or "")


def attention_support(model_class: type) -> tuple[bool, bool, list[str]]:
    """(sdpa supported, flash attention supported, the only flash kernels it runs: [] when any), as the
    model class declares them (``_supports_sdpa``, ``_supports_flash_attn``,
    ``_compatible_flash_implementations``); read before loading, so no weights load twice."""
    return (
        bool(getattr(model_class, "_supports_sdpa", True)),
        bool(getattr(model_class, "_supports_flash_attn", True)),
        list(getattr(model_class, "_compatible_flash_implementations", None) or []),
    )


def keep_in_fp32_modules(model: Any) -> list[str] | None:
    """The modules a model class keeps in float32 whatever the load dtype (``_keep_in_fp32_modules``)."""
    return getattr(model, "_keep_in_fp32_modules", None)


def name_or_path(config: Any) -> str:
    """Where a config was loaded from (``config._name_or_path``), '' when built in memory."""
    return str(getattr(config, "_name_or_path", "") or "")


MASK_BUILDERS = ("create_causal_mask(", "create_sliding_window_causal_mask(", "mask_kwargs = {")


def mask_reads_position_ids(decoder: Any) -> bool:
    """Whether ``decoder.forward`` hands ``position_ids`` to transformers' mask builders (which turn
    restarting positions into a per-sample mask, what padding-free batches need with eager/sdpa).

    No attribute or flag says this, so it is read from the forward's source, here and nowhere else: a
    forward that builds no mask through the builders is taken at its word (True). Pinned on Llama
    (hands them over) and gpt-oss (builds its mask without them) by ``tests/test_compat.py``."""
    try:
        source = inspect.getsource(type(decoder).forward)
    except (OSError, TypeError):
        return True
    calls = []
    for opening in MASK_BUILDERS:
        start = source.find(opening)
        while start != -1:
            calls.append(_bracketed(source, start + len(opening) - 1))
            start = source.find(opening, start + 1)
    return not calls or any("position_ids" in call for call in calls)


def _bracketed(source: str, open_at: int) -> str:
    """The text from the bracket at ``open_at`` to its match."""
    depth = 0
    for i in range(open_at, len(source)):
        if source[i] in "({[":
            depth += 1
        elif source[i] in ")}]":
            depth -= 1
            if depth == 0:
                return source[open_at : i + 1]
    return source[open_at:]


def no_split_modules(model: Any) -> list[str]:
    """The layer classes a model lists as never split (``PreTrainedModel._no_split_modules``), which
    accelerate's FSDP wraps by when no class is named."""
    return list(getattr(model, "_no_split_modules", None) or [])


def set_no_split_modules(model: Any, names: list[str]) -> None:
    """Set :func:`no_split_modules` on this instance only."""
    model._no_split_modules = names
