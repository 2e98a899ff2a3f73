"""torch's private names (2.x), each pinned by ``tests/test_compat.py``."""

from __future__ import annotations

from typing import Any


def optimizer_step_dtype(is_fused: bool | None = None) -> Any:
    """The dtype ``torch.optim.AdamW`` gives its own step counter (``optimizer._get_scalar_dtype``), so an
    optimizer of ours that initialises state lazily writes checkpoints identical to AdamW's."""
    from torch.optim.optimizer import _get_scalar_dtype

    return _get_scalar_dtype(is_fused=is_fused)


def default_store() -> Any:
    """The key-value store the default process group rendezvoused through
    (``torch.distributed.distributed_c10d._get_default_store``): every rank reaches it without a
    collective, so a rank can tell the others something while they are blocked inside one."""
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()
