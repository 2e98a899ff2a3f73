"""The one table of dtype names the command line takes (``--torch_dtype``, ``tuning merge --dtype``)."""

from __future__ import annotations

from typing import Any

# what a user may write; "auto" means the checkpoint's own dtype (config.json)
DTYPE_NAMES = ("bfloat16", "float16", "float32", "auto")


def torch_dtype(name: str) -> Any:
    """``torch.bfloat16`` for ``"bfloat16"`` and so on; ``"auto"`` stays ``"auto"`` (transformers
    reads it as "the checkpoint's dtype"). torch is imported here, not at module import."""
    if name == "auto":
        return "auto"
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype name {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)
