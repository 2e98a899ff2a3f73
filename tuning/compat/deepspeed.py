"""DeepSpeed's private names (0.x), each pinned by ``tests/test_compat.py`` (skipped without DeepSpeed)."""

from __future__ import annotations

from typing import Any


def zero_config(engine: Any) -> Any:
    """The ZeRO section of a DeepSpeed engine's parsed config (``engine._config.zero_config``), what its
    save reads ``stage3_gather_16bit_weights_on_model_save`` from; None without an engine."""
    return getattr(getattr(engine, "_config", None), "zero_config", None)
