"""Weights & Biases through a run object (no process-wide ``wandb.run`` reliance). Offline runs
(``WANDB_MODE=offline``) write under ``output_dir/wandb`` for a later ``wandb sync``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import wandb

from tuning.config import TrackerArgs
from tuning.trackers.protocol import RunInfo


class WandbTracker:
    name = "wandb"

    def __init__(self, args: TrackerArgs, output_dir: str) -> None:
        self.project = args.wandb_project or os.environ.get("WANDB_PROJECT") or args.experiment
        self.dir = str(Path(output_dir).resolve())
        self.run: Any = None

    def start(self, info: RunInfo) -> dict[str, Any]:
        project = self.project or info.experiment
        # wandb's own settings (WANDB_MODE, WANDB_API_KEY, WANDB_ENTITY) come from the environment as usual
        self.run = wandb.init(
            project=project, name=info.run_name, config=info.params, dir=self.dir, reinit="create_new"
        )
        return {
            "run_id": self.run.id,
            "project": project,
            "mode": self.run.settings.mode,
            "dir": self.run.dir,
        }

    def log(self, metrics: dict[str, float], step: int, epoch: float) -> None:
        self.run.log({**metrics, "epoch": epoch}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
