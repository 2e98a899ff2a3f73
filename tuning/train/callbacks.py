"""Trainer callbacks: the ``training_logs.jsonl`` file every run writes.

The file is one history, consistent with the checkpoints in ``output_dir``: a resumed run drops the
records after its checkpoint (it logs those steps again), and never removes records of a checkpoint
that still exists before it has replaced that checkpoint (``tuning/train/records.py``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuning.files import write_text_atomic
from tuning.train.checkpoint_format import checkpoint_step, latest_complete_checkpoint
from tuning.train.records import pending_dir, record_path

TRAINING_LOGS_NAME = "training_logs.jsonl"
# Hugging Face log key → the record name the fms-hf-tuning family writes.
LOGGED_METRICS = {"loss": "training_loss", "eval_loss": "validation_loss"}
# online data mixing's per-dataset sampling ratios and draws (tuning/data/odm.py), under their own names
MIXING_PREFIX = "odm_"
# fields each record carries beside its value: Hugging Face log key prefix of the record's metric
RECORD_FIELDS = ("mean_token_accuracy", "window_trained_tokens")


class TrainingLogCallback(TrainerCallback):
    """Appends ``{"name", "data": {epoch, step, value, timestamp}}`` lines; rank 0 only."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)

    @property
    def path(self) -> Path:
        """Where the next record goes: the pending copy until this run's first commit, if it has one."""
        return record_path(self.output_dir, TRAINING_LOGS_NAME)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            continue_training_logs(self.output_dir, state.global_step)

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
        records = []
        for key, name in LOGGED_METRICS.items():
            if key in logs:
                prefix = key[: -len("loss")]  # "" or "eval_"
                data = {"value": float(logs[key])}
                data.update({f: logs[prefix + f] for f in RECORD_FIELDS if prefix + f in logs})
                records.append((name, data))
        records += [(k, {"value": float(v)}) for k, v in logs.items() if k.startswith(MIXING_PREFIX)]
        self.append(state, records)

    def append(self, state: TrainerState, records: list[tuple[str, dict[str, Any]]]) -> None:
        """Append ``(name, data)`` records stamped with the step, epoch and time (rank 0 calls this)."""
        if not records:
            return
        epoch, now = round(float(state.epoch or 0.0), 6), datetime.now(timezone.utc).isoformat()
        lines = [
            json.dumps(
                {"name": name, "data": {"epoch": epoch, "step": state.global_step, **data, "timestamp": now}}
            )
            for name, data in records
        ]
        path = self.path  # pending or live: decided once per record
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def continue_training_logs(output_dir: Path, resumed_step: int, name: str = TRAINING_LOGS_NAME) -> None:
    """Make the log this run appends to (``name``: ``training_logs.jsonl`` or another per-step record
    file) hold exactly the records up to ``resumed_step``.

    Records after it (all of them on a fresh start) are the steps this run logs again. When they are
    only a killed run's steps past the newest checkpoint, they are dropped in place. When they belong
    to a checkpoint still in ``output_dir`` (starting over, resuming from an earlier one, skipping a
    damaged one) the file stays as it is and this run continues a pending copy, which replaces it at
    this run's first commit: a kill before that leaves the checkpoints and their history together.
    """
    live = output_dir / name
    if not live.is_file():
        return
    lines = [line for line in live.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [_record_step(line) for line in lines]
    kept = [line for line, step in zip(lines, steps, strict=True) if step <= resumed_step]
    if len(kept) == len(lines):
        return
    newest = latest_complete_checkpoint(output_dir)
    newest_step = checkpoint_step(newest) if newest else None
    orphans = newest_step is not None and all(step > newest_step for step in steps if step > resumed_step)
    target = live if orphans else pending_dir(output_dir) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, "".join(line + "\n" for line in kept))


def _record_step(line: str) -> int:
    try:
        record = json.loads(line)
        return int(record.get("data", record)["step"])  # {"name", "data": {"step"...}} or {"step"...}
    except (ValueError, KeyError, TypeError, AttributeError):  # a line cut by a kill mid-write: drop it
        return 1 << 62


def read_training_logs(output_dir: str | Path, name: str = "training_loss") -> list[dict[str, Any]]:
    """The ``data`` records of one metric from ``training_logs.jsonl``, in order."""
    path = Path(output_dir) / TRAINING_LOGS_NAME
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["data"] for r in records if r["name"] == name]
