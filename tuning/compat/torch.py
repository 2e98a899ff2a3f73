"""torch's private names (2.x), each pinned by ``tests/test_compat.py``."""

from __future__ import annotations

from typing import Any


def optimizer_step_dtype(is_fused: bool | None = None) -> Any:
    """The dtype ``torch.optim.AdamW`` gives its own step counter (``optimizer._get_scalar_dtype``), so an
    optimizer of ours that initialises state lazily writes checkpoints identical to AdamW's."""
    from torch.optim.optimizer import _get_scalar_dtype

    return _get_scalar_dtype(is_fused=is_fused)
