"""MLflow through a client object (no process-wide active run). Without ``--mlflow_tracking_uri`` the
store is ``sqlite:///OUTPUT_DIR/mlflow.db``: mlflow's plain file store is in maintenance mode."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from tuning.config import TrackerArgs
from tuning.trackers.protocol import RunInfo

MAX_PARAM_CHARS = 6000  # mlflow's limit on one parameter value
MAX_BATCH = 100  # parameters per log_batch call


class MlflowTracker:
    name = "mlflow"

    def __init__(self, args: TrackerArgs, output_dir: str) -> None:
        out = Path(output_dir).resolve()
        self.uri = args.mlflow_tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
        # a local store would put artifacts in ./mlruns of whatever folder the job started in
        self.artifacts = None if args.mlflow_tracking_uri else (out / "mlflow_artifacts").as_uri()
        self.experiment = args.mlflow_experiment or args.experiment
        self.client: MlflowClient | None = None
        self.run_id: str | None = None

    def start(self, info: RunInfo) -> dict[str, Any]:
        self.client = MlflowClient(tracking_uri=self.uri)
        name = self.experiment or info.experiment
        found = self.client.get_experiment_by_name(name)
        exp_id = found.experiment_id if found else self.client.create_experiment(name, self.artifacts)
        self.run_id = self.client.create_run(exp_id, run_name=info.run_name).info.run_id
        params = [Param(k, _param_value(v)) for k, v in sorted(info.params.items())]
        for i in range(0, len(params), MAX_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_BATCH])
        return {"run_id": self.run_id, "tracking_uri": self.uri, "experiment": name, "experiment_id": exp_id}

    def log(self, metrics: dict[str, float], step: int, epoch: float) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_text(self, name: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{name}/step-{step:07d}.md")

    def finish(self) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_CHARS]
