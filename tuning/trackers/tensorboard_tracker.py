"""TensorBoard: event files under ``$TENSORBOARD_LOGGING_DIR`` (the variable transformers 5 reads) or
``output_dir/tensorboard``, one folder per run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from tuning.config import TrackerArgs
from tuning.trackers.protocol import RunInfo


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, args: TrackerArgs, output_dir: str) -> None:
        default = os.environ.get("TENSORBOARD_LOGGING_DIR") or Path(output_dir) / "tensorboard"
        self.root = Path(args.tensorboard_dir or default)
        self.writer: SummaryWriter | None = None

    def start(self, info: RunInfo) -> dict[str, Any]:
        log_dir = self.root.resolve() / info.run_name
        self.writer = SummaryWriter(log_dir=str(log_dir))
        text = json.dumps(info.params, indent=2, sort_keys=True, default=str)
        self.writer.add_text("config", f"```\n{text}\n```")
        return {"run_id": info.run_name, "log_dir": str(log_dir), "experiment": info.experiment}

    def log(self, metrics: dict[str, float], step: int, epoch: float) -> None:
        for key, value in metrics.items():
            tag = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_text(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(f"eval/{name}", text, step)
        self.writer.flush()

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
