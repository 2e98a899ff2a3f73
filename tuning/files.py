"""Neutral file helpers every stage may use: reading YAML/JSON mappings, and durable writes.

Nothing here knows about configs, data or models; it imports only :mod:`tuning.errors`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from tuning.errors import UserError


def read_mapping_file(path: str | Path, what: str, shown: str | None = None) -> dict[str, Any]:
    """The mapping a YAML or JSON file holds (``.json`` is read as JSON, anything else as YAML, both
    without running code), or a UserError naming ``what`` and the file (``shown``: how the user typed it).
    Shared by ``--config``, data configs and launcher job files."""
    file, shown = Path(path), shown or str(path)
    if not file.is_file():
        raise UserError(f"{what} {shown} does not exist; pass an existing YAML or JSON file")
    kind = "JSON" if file.suffix == ".json" else "YAML"
    try:
        text = file.read_text(encoding="utf-8")
        values = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{what} {shown} is not valid {kind}: {' '.join(str(e).split())}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UserError(
            f"{what} {shown} must hold a mapping of keys to values, not a {type(values).__name__}"
        )
    return values


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # some filesystems (and Windows) can't fsync a directory; the rename is still atomic
    with contextlib.suppress(OSError):
        fsync_file(path)
