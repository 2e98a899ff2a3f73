"""accelerate's private names (1.x), each pinned by ``tests/test_compat.py``."""

from __future__ import annotations

from typing import Any


def set_shared_distributed_type(distributed_type: Any) -> None:
    """Make the process-wide ``PartialState`` agree with a distributed type we set on the
    ``AcceleratorState``: a later ``AcceleratorState()`` copies ``PartialState._shared_state`` back
    over it, as accelerate's own set-up does, which would otherwise silently undo our routing."""
    from accelerate.state import PartialState

    PartialState._shared_state["distributed_type"] = distributed_type
