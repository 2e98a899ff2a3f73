"""trackio (Hugging Face's local-first tracker): runs recorded in its local database
(``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``), viewed with ``trackio show``."""

from __future__ import annotations

from typing import Any

import trackio

from tuning.config import TrackerArgs
from tuning.trackers.protocol import RunInfo


class TrackioTracker:
    name = "trackio"

    def __init__(self, args: TrackerArgs, output_dir: str) -> None:
        self.project = args.trackio_project or args.experiment
        self.run: Any = None

    def start(self, info: RunInfo) -> dict[str, Any]:
        project = self.project or info.experiment
        # system metrics threads off, as for aim: the metrics are the ones we log
        self.run = trackio.init(
            project=project, name=info.run_name, config=info.params, auto_log_cpu=False, auto_log_gpu=False
        )
        return {"run_id": getattr(self.run, "name", info.run_name), "project": project}

    def log(self, metrics: dict[str, float], step: int, epoch: float) -> None:
        self.run.log({**metrics, "epoch": epoch}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
