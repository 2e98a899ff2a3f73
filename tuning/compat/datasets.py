"""datasets' private names (4.x), each pinned by ``tests/test_compat.py``."""

from __future__ import annotations

from typing import Any


def indices_table(dataset: Any) -> Any:
    """The indices mapping a ``select``/``shuffle`` put over a dataset's table (a pyarrow table whose first
    column is the row order), or None when the rows are in table order (``Dataset._indices``). Reading it
    is what lets the data digest cover the order without materialising the dataset."""
    return getattr(dataset, "_indices", None)
