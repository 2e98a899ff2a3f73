"""Column handlers: duplicate, rename, select, remove, and skipping rows with an over-long column."""

from __future__ import annotations

from typing import Any

from tuning.data.handlers.registry import register_handler


@register_handler(
    aliases={"old_column": "existing_column_name", "new_column": "new_column_name"},
    columns=("existing_column_name",),
)
def duplicate_columns(
    batch: dict[str, list], *, existing_column_name: str, new_column_name: str
) -> dict[str, list]:
    """A copy of a column under a new name (``input_ids`` → ``labels`` trains on every token)."""
    return {new_column_name: [list(v) if isinstance(v, list) else v for v in batch[existing_column_name]]}


@register_handler(kind="dataset", columns=("column_mapping",))
def rename_columns(dataset: Any, *, column_mapping: dict[str, str]) -> Any:
    return dataset.rename_columns(column_mapping)


@register_handler(kind="dataset", columns=("column_names",))
def select_columns(dataset: Any, *, column_names: list[str]) -> Any:
    return dataset.select_columns(column_names)


@register_handler(kind="dataset", columns=("column_names",))
def remove_columns(dataset: Any, *, column_names: list[str]) -> Any:
    return dataset.remove_columns(column_names)


@register_handler(kind="filter", columns=("column_name",))
def skip_samples_with_large_columns(
    batch: dict[str, list], *, column_name: str, max_allowed_length: int
) -> list[bool]:
    """Keep rows whose ``column_name`` (text or token list) has at most ``max_allowed_length`` items."""
    return [v is None or len(v) <= max_allowed_length for v in batch[column_name]]
