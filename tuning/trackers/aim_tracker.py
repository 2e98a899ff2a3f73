"""aim: a local repository (default: output_dir) or a remote aim server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aim import Run, Text

from tuning.config import TrackerArgs
from tuning.trackers.protocol import RunInfo

AIM_DEFAULT_PORT = 53800


class AimTracker:
    name = "aim"

    def __init__(self, args: TrackerArgs, output_dir: str) -> None:
        self.experiment = args.aim_experiment  # fms-hf-tuning's key; default the run's --experiment
        if args.aim_url:  # fms-hf-tuning's aim://HOST:PORT
            self.repo = args.aim_url
        elif args.aim_remote_server_ip:
            self.repo = f"aim://{args.aim_remote_server_ip}:{args.aim_remote_server_port or AIM_DEFAULT_PORT}"
        else:
            self.repo = str(Path(args.aim_repo or output_dir).resolve())
        self.run: Run | None = None

    def start(self, info: RunInfo) -> dict[str, Any]:
        # system params need pkg_resources (gone from new setuptools), and the terminal capture and
        # system-stats threads outlive failures: all off
        self.run = Run(
            repo=self.repo,
            experiment=self.experiment or info.experiment,
            log_system_params=False,
            system_tracking_interval=None,
            capture_terminal_logs=False,
        )
        self.run.name = info.run_name
        self.run["hparams"] = info.params
        return {"run_id": self.run.hash, "repo": self.repo, "experiment": self.experiment or info.experiment}

    def log(self, metrics: dict[str, float], step: int, epoch: float) -> None:
        for key, value in metrics.items():
            subset = "eval" if key.startswith("eval_") else "train"
            self.run.track(
                value, name=key.removeprefix("eval_"), step=step, epoch=epoch, context={"subset": subset}
            )

    def log_text(self, name: str, text: str, step: int) -> None:
        self.run.track(Text(text), name=name, step=step, context={"subset": "eval"})

    def finish(self) -> None:
        if self.run is not None:
            self.run.close()
