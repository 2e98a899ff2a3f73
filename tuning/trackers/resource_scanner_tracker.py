"""hf_resource_scanner (HFResourceScanner, fms-hf-tuning's): the package's own Trainer callback measures
one step (time per phase, memory by category, tokens/s) and writes ``--scanner_output_filename`` in
output_dir (a ``.json`` name writes JSON)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch.distributed as dist
from HFResourceScanner import Scanner
from transformers import Trainer

from tuning.config import TrackerArgs
from tuning.trackers.protocol import RunInfo


class ResourceScannerTracker:
    name = "hf_resource_scanner"

    def __init__(self, args: TrackerArgs, output_dir: str) -> None:
        self.path = Path(output_dir).resolve() / args.scanner_output_filename
        # the scanner is a Trainer callback of its own; TrackerCallback hands it to the Trainer
        self.callback = Scanner(output_fmt=str(self.path))
        # The scanner patches the Trainer class and torch.distributed's collectives at step 0 and puts
        # them back only once it has seen a checkpoint save / its target step; a run that ends sooner
        # (or saves nothing) would leave them patched for the rest of the process (a notebook's next run).
        self._saved = {owner: dict(vars(owner)) for owner in (Trainer, dist)}

    def start(self, info: RunInfo) -> dict[str, Any]:
        return {"run_id": None, "output": str(self.path)}

    def log(self, metrics: dict[str, float], step: int, epoch: float) -> None:
        pass  # the scanner records its one step itself

    def finish(self) -> None:
        for owner, saved in self._saved.items():
            _restore(owner, saved)


def _restore(owner: type | ModuleType, saved: dict[str, Any]) -> None:
    for name, value in list(vars(owner).items()):
        if name in saved and saved[name] is not value and callable(value):
            setattr(owner, name, saved[name])
