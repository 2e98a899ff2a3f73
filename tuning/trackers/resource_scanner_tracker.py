"""hf_resource_scanner (HFResourceScanner, fms-hf-tuning's): the package's own Trainer callback measures
one step (time per phase, memory by category, tokens/s) and writes ``--scanner_output_filename`` in
output_dir (a ``.json`` name writes JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from HFResourceScanner import Scanner

from tuning.config import TrackerArgs
from tuning.trackers.protocol import RunInfo


class ResourceScannerTracker:
    name = "hf_resource_scanner"

    def __init__(self, args: TrackerArgs, output_dir: str) -> None:
        self.path = Path(output_dir).resolve() / args.scanner_output_filename
        # the scanner is a Trainer callback of its own; TrackerCallback hands it to the Trainer
        self.callback = Scanner(output_fmt=str(self.path))

    def start(self, info: RunInfo) -> dict[str, Any]:
        return {"run_id": None, "output": str(self.path)}

    def log(self, metrics: dict[str, float], step: int, epoch: float) -> None:
        pass  # the scanner records its one step itself

    def finish(self) -> None:
        pass
