"""What a tracker is: the protocol every implementation follows and the run facts it records.
(A module of its own so that the implementations need not import the package that loads them.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class RunInfo:
    """What every tracker records about the run before the first step."""

    experiment: str
    run_name: str
    output_dir: str
    params: dict[str, Any] = field(default_factory=dict)
    export_dir: str | None = None  # --run_uri_export_path: a copy of each <tracker>_tracker.json


class Tracker(Protocol):
    name: str

    def start(self, info: RunInfo) -> dict[str, Any]:
        """Open the run; return ``{"run_id": ..., ...}``, written to ``<name>_tracker.json``."""

    def log(self, metrics: dict[str, float], step: int, epoch: float) -> None: ...

    def finish(self) -> None: ...
