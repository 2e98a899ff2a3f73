"""Trainer callbacks: the ``training_logs.jsonl`` file every run writes."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

TRAINING_LOGS_NAME = "training_logs.jsonl"
# Hugging Face log key → the record name the fms-hf-tuning family writes.
LOGGED_METRICS = {"loss": "training_loss", "eval_loss": "validation_loss"}


class TrainingLogCallback(TrainerCallback):
    """Appends ``{"name", "data": {epoch, step, value, timestamp}}`` lines; rank 0 only."""

    def __init__(self, output_dir: str) -> None:
        self.path = Path(output_dir) / TRAINING_LOGS_NAME

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # A resumed run re-logs every step after its checkpoint: drop the killed run's records past it
        # (and all of them on a fresh start) so the file stays one history, no duplicates, no gaps.
        if state.is_world_process_zero and self.path.is_file():
            truncate_training_logs(self.path, state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        lines = []
        for key, name in LOGGED_METRICS.items():
            if key in logs:
                data = {
                    "epoch": round(float(state.epoch or 0.0), 6),
                    "step": state.global_step,
                    "value": float(logs[key]),
                    "timestamp": datetime.now(timezone.utc).isoformat(),
                }
                lines.append(json.dumps({"name": name, "data": data}))
        if lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")


def truncate_training_logs(path: Path, last_step: int) -> None:
    """Keep only the records with ``step <= last_step``; rewritten under a temporary name, then renamed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and _record_step(line) <= last_step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["data"]["step"])
    except (ValueError, KeyError, TypeError):  # a line cut by a kill mid-write: drop it
        return 1 << 62


def read_training_logs(output_dir: str | Path, name: str = "training_loss") -> list[dict[str, Any]]:
    """The ``data`` records of one metric from ``training_logs.jsonl``, in order."""
    path = Path(output_dir) / TRAINING_LOGS_NAME
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["data"] for r in records if r["name"] == name]
