"""ClearML: one task per run (``--clearml_project`` / ``--clearml_task``, fms-hf-tuning's keys). Offline
(``CLEARML_OFFLINE_MODE=1``) the task is recorded in ClearML's offline cache for ``clearml-task --import``.
Framework auto-logging and resource monitoring stay off: the metrics are the ones we log."""

from __future__ import annotations

import os
import signal
from typing import Any

from clearml import Task

from tuning.compat import clearml as clearml_private
from tuning.config import TrackerArgs
from tuning.trackers.protocol import RunInfo


class ClearMLTracker:
    name = "clearml"

    def __init__(self, args: TrackerArgs, output_dir: str) -> None:
        self.project = args.clearml_project or args.experiment
        self.task_name = args.clearml_task
        self.task: Any = None

    def start(self, info: RunInfo) -> dict[str, Any]:
        offline = os.environ.get("CLEARML_OFFLINE_MODE", "").lower() in ("1", "true", "yes")
        if offline:
            Task.set_offline(offline_mode=True)
        # Task.init installs ClearML's own SIGTERM/SIGINT hooks over ours (checkpoint, then exit 143/130;
        # tuning/train/signals.py); ours stay, and finish() closes the task on every way out
        kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        clearml_private.report_from_threads(Task)  # no fork of a process that trains (and runs threads)
        self.task = Task.init(
            project_name=self.project or info.experiment,
            task_name=self.task_name or info.run_name,
            auto_connect_frameworks=False,
            auto_connect_arg_parser=False,
            auto_resource_monitoring=False,
            reuse_last_task_id=False,
        )
        for number, handler in kept.items():
            if handler is not None:  # None: a handler set outside Python, which Python can't reinstate
                signal.signal(number, handler)
        self.task.connect(
            {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in info.params.items()}
        )
        link = {"run_id": self.task.id, "project": self.project or info.experiment, "offline": offline}
        if offline:
            link["offline_folder"] = str(self.task.get_offline_mode_folder())
        return link

    def log(self, metrics: dict[str, float], step: int, epoch: float) -> None:
        report = self.task.get_logger()
        for key, value in metrics.items():
            title = "eval" if key.startswith("eval_") else "train"
            report.report_scalar(title=title, series=key.removeprefix("eval_"), value=value, iteration=step)

    def finish(self) -> None:
        if self.task is not None:
            kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
            self.task.close()
            for number, handler in kept.items():  # close() resets them to the default
                signal.signal(number, handler)
