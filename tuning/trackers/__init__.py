"""Experiment trackers: one small protocol, one Trainer callback in front of all of them.

Why our own callbacks rather than transformers' ``report_to`` integrations: those configure themselves
from process-wide environment variables, record every TrainingArguments field but not our config,
data or token counts, and an exception in them (a tracking server gone) ends the training run. Here a
failing tracker is logged once and dropped; the run goes on.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuning.config import SFTConfig, TrackerArgs, resolved_config_dict
from tuning.errors import UserError, first_line
from tuning.trackers.protocol import RunInfo
from tuning.train import TokenRate, new_record_path

logger = logging.getLogger(__name__)


def _file_logger() -> type:
    from tuning.trackers.file_logger import FileLoggerTracker

    return FileLoggerTracker


def _aim() -> type:
    from tuning.trackers.aim_tracker import AimTracker

    return AimTracker


def _tensorboard() -> type:
    from tuning.trackers.tensorboard_tracker import TensorBoardTracker

    return TensorBoardTracker


def _mlflow() -> type:
    from tuning.trackers.mlflow_tracker import MlflowTracker

    return MlflowTracker


def _wandb() -> type:
    from tuning.trackers.wandb_tracker import WandbTracker

    return WandbTracker


def _clearml() -> type:
    from tuning.trackers.clearml_tracker import ClearMLTracker

    return ClearMLTracker


def _trackio() -> type:
    from tuning.trackers.trackio_tracker import TrackioTracker

    return TrackioTracker


def _resource_scanner() -> type:
    from tuning.trackers.resource_scanner_tracker import ResourceScannerTracker

    return ResourceScannerTracker


# tracker name → (package that must import, pip extra, our implementation). Each implementation is a plain
# import inside a function (not importlib), so the import-direction test sees it and it loads only when asked.
REGISTRY: dict[str, tuple[str | None, str | None, Callable[[], type]]] = {
    "file_logger": (None, None, _file_logger),
    "aim": ("aim", "aim", _aim),
    "tensorboard": ("tensorboard", "tensorboard", _tensorboard),
    "mlflow": ("mlflow", "mlflow", _mlflow),
    "wandb": ("wandb", "wandb", _wandb),
    "clearml": ("clearml", "clearml", _clearml),
    "trackio": ("trackio", "trackio", _trackio),
    "hf_resource_scanner": ("HFResourceScanner", "hf_resource_scanner", _resource_scanner),
}


class NullTracker:
    """What every process but rank 0 holds: the same trackers, recording nothing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def start(self, info: RunInfo) -> dict[str, Any]:
        return {}

    def log(self, metrics: dict[str, float], step: int, epoch: float) -> None:
        pass

    def finish(self) -> None:
        pass


def tracker_class(name: str) -> type:
    """Import a tracker's implementation; a missing package is a UserError with the install command."""
    package, extra, target = REGISTRY[name]
    if package is not None:
        try:
            importlib.import_module(package)
        except ImportError:
            raise UserError(
                f"--trackers {name}: the {package} package is not installed; "
                f"install it with: pip install 'tuning[{extra}]'"
            ) from None
    return target()


def build_trackers(config: SFTConfig) -> TrackerCallback:
    """The trackers ``--trackers`` asks for, as one callback. Imports happen here, before the model loads,
    so a missing package fails in seconds; every rank checks, only rank 0 records."""
    targs, output_dir = config.trackers, config.train.output_dir
    classes = {name: tracker_class(name) for name in targs.trackers}
    main = config.train.process_index == 0
    trackers = [cls(targs, output_dir) if main else NullTracker(name) for name, cls in classes.items()]
    return TrackerCallback(trackers, run_info(config))


def run_info(config: SFTConfig) -> RunInfo:
    targs: TrackerArgs = config.trackers
    output_dir = config.train.output_dir
    experiment = targs.experiment or Path(output_dir).resolve().name
    params = {
        **resolved_config_dict(config),
        "model": config.model.model_name_or_path,
        "datasets": [p for p in (config.data.training_data_path, config.data.validation_data_path) if p],
        **{f"exp_metadata.{k}": v for k, v in (targs.exp_metadata or {}).items()},
    }
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return RunInfo(
        experiment=experiment,
        run_name=f"{experiment}-{stamp}",
        output_dir=output_dir,
        params=params,
        export_dir=targs.run_uri_export_path,
    )


def loggable(logs: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a Trainer log record, without the epoch (passed on its own)."""
    return {
        k: float(v)
        for k, v in logs.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def markdown_table(records: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """``records`` as a markdown table of ``columns`` (a ``|`` or newline in a value is escaped)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    rows = [f"| {' | '.join(columns)} |", f"|{' --- |' * len(columns)}"]
    rows += [f"| {' | '.join(cell(r.get(c, '')) for c in columns)} |" for r in records]
    return "\n".join(rows)


class TrackerCallback(TrainerCallback):
    """Starts, feeds and finishes every tracker; a tracker that raises is warned about and dropped."""

    def __init__(self, trackers: list[Any], info: RunInfo) -> None:
        self.trackers = list(trackers)
        self.info = info
        self.run_ids: dict[str, Any] = {}
        self.rate = TokenRate()
        self._started = False

    @property
    def trainer_callbacks(self) -> list[TrainerCallback]:
        """Trackers that are Trainer callbacks of their own (hf_resource_scanner's scanner)."""
        return [t.callback for t in self.trackers if getattr(t, "callback", None) is not None]

    def _guard(self, tracker: Any, action: str, call: Any) -> Any:
        try:
            return call()
        except Exception as e:  # a tracker must never cost the run: warn once, stop using it
            logger.warning(
                "tracker %s failed to %s (%s: %s); training continues without it",
                tracker.name,
                action,
                type(e).__name__,
                first_line(e),
            )
            self.trackers.remove(tracker)
            return None

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # opening runs (aim repo, mlflow database migrations) takes seconds: do it before train() starts
        # its clock, so the run's time and tokens/s measure training only
        self.start()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.start()  # no-op when on_init_end already did it (a callback added after the Trainer was built)
        self.rate.start(resumed=state.global_step > 0)

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for tracker in list(self.trackers):
            link = self._guard(tracker, "start", lambda t=tracker: t.start(self.info))
            if link:
                self.run_ids[tracker.name] = link.get("run_id")
                path = write_tracker_json(self.info.output_dir, tracker.name, link)
                if self.info.export_dir:  # fms-hf-tuning's run_uri_export_path
                    Path(self.info.export_dir).mkdir(parents=True, exist_ok=True)
                    (Path(self.info.export_dir) / path.name).write_text(
                        path.read_text(encoding="utf-8"), encoding="utf-8"
                    )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        metrics = loggable(logs or {})
        if "trained_tokens" in metrics:
            rate = self.rate.update(metrics["trained_tokens"])
            if rate is not None:
                metrics["trained_tokens_per_second"] = rate
        if not metrics:
            return
        epoch = float(state.epoch or 0.0)
        for tracker in list(self.trackers):
            self._guard(tracker, "log", lambda t=tracker: t.log(metrics, state.global_step, epoch))

    def log_text(self, name: str, records: list[dict[str, Any]], step: int) -> None:
        """Rows of text (``--eval_generations``: prompt, reference, generation) to every tracker that
        shows text, as one markdown table per step."""
        text = markdown_table(records, ("prompt", "reference", "generation"))
        for tracker in list(self.trackers):
            if hasattr(tracker, "log_text"):
                self._guard(tracker, "log text", lambda t=tracker: t.log_text(name, text, step))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    def close(self) -> None:
        """Finish every tracker, once. The entry point also calls it when training raises: the Trainer
        skips on_train_end then, and a tracker run left open looks like it is still going."""
        for tracker in list(self.trackers):
            self._guard(tracker, "finish", tracker.finish)
        self.trackers.clear()


def write_tracker_json(output_dir: str, name: str, link: dict[str, Any]) -> Path:
    # replaces the earlier run's link only once this run has committed a checkpoint (tuning/train/records.py)
    path = new_record_path(output_dir, f"{name}_tracker.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"tracker": name, **link}, indent=2, default=str) + "\n", encoding="utf-8")
    return path
