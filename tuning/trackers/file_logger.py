"""The always-on tracker: ``training_logs.jsonl`` (written by ``tuning/train/callbacks.py``, which also
keeps it consistent across resumes); the entry point draws ``loss.png`` from it at the end."""

from __future__ import annotations

from typing import Any

from tuning.config import TrackerArgs
from tuning.trackers.protocol import RunInfo


class FileLoggerTracker:
    name = "file_logger"

    def __init__(self, args: TrackerArgs, output_dir: str) -> None:
        self.output_dir = output_dir

    def start(self, info: RunInfo) -> dict[str, Any]:
        return {}  # the log file is the run: no id to link, no file_logger_tracker.json

    def log(self, metrics: dict[str, float], step: int, epoch: float) -> None:
        pass  # TrainingLogCallback writes the records

    def finish(self) -> None:
        pass
