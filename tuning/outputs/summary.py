"""The end of a run: every number a person asks about, as ``output_dir/run_summary.json`` and one line."""

from __future__ import annotations

import json
import resource
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tuning.data import PaddingFreeCollator, PreparedData
from tuning.files import write_text_atomic
from tuning.outputs.audit_report import AUDIT_JSON_NAME
from tuning.outputs.plot import LOSS_PLOT_NAME
from tuning.trackers import TrackerCallback
from tuning.train import EarlyStopping, EvalGenerations, is_complete, list_checkpoints, per_rank

RUN_SUMMARY_NAME = "run_summary.json"


def build_summary(trainer: Any, result: Any, seconds: float, data: PreparedData, saved: Path | None) -> dict:
    """Every number a person asks about after a run; ``run_summary.json`` is this dict."""
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    mean = trainer.mean_train_loss() if hasattr(trainer, "mean_train_loss") else result.training_loss
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    out = Path(trainer.args.output_dir)
    trackers = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TrackerCallback)), None)
    # each rank counted its own batches; all ranks call this. The count is the whole run's (a resumed run
    # starts from its checkpoint's); the rate is this process's: its tokens over its seconds
    tokens = sum(per_rank(trainer.trained_tokens))
    this_run = sum(per_rank(trainer.trained_tokens - getattr(trainer, "trained_tokens_at_start", 0)))
    return {
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_seconds": round(seconds, 3),
        "trained_tokens": tokens,
        "trained_tokens_per_second": this_run / seconds if seconds > 0 else 0.0,
        "peak_memory_bytes": peak_memory_bytes(),
        "final_loss": losses[-1] if losses else mean,
        "best_loss": min(losses) if losses else mean,
        "mean_train_loss": mean,
        "final_validation_loss": evals[-1] if evals else None,
        "best_validation_loss": min(evals) if evals else None,
        "rows": data.stats.rows,
        "rows_kept": data.stats.rows_kept,
        "samples": data.stats.samples,
        "samples_kept": data.stats.kept,
        "data_audit": str(out / AUDIT_JSON_NAME) if (out / AUDIT_JSON_NAME).is_file() else None,
        # padding-free (the default where exact) or padded batches: what --padding_free got
        "padding_free": isinstance(trainer.data_collator, PaddingFreeCollator),
        "output_dir": str(out),
        "checkpoints": [str(p) for p in list_checkpoints(out) if is_complete(p)],
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "save_model_dir": str(saved) if saved else None,
        "loss_plot": str(out / LOSS_PLOT_NAME) if (out / LOSS_PLOT_NAME).is_file() else None,
        "trackers": dict(trackers.run_ids) if trackers else {},
        **_quality(trainer),
    }


def _quality(trainer: Any) -> dict[str, Any]:
    """Token accuracy (last training and validation records), early stopping, sample generations."""
    history = trainer.state.log_history
    train = [h["mean_token_accuracy"] for h in history if "mean_token_accuracy" in h]
    valid = [h["eval_mean_token_accuracy"] for h in history if "eval_mean_token_accuracy" in h]
    callbacks = trainer.callback_handler.callbacks
    stopping = next((c for c in callbacks if isinstance(c, EarlyStopping)), None)
    generations = next((c for c in callbacks if isinstance(c, EvalGenerations)), None)
    return {
        "final_mean_token_accuracy": train[-1] if train else None,
        "final_validation_mean_token_accuracy": valid[-1] if valid else None,
        "best_validation_mean_token_accuracy": max(valid) if valid else None,
        "early_stopping": stopping.report(trainer.args, trainer.state) if stopping else None,
        "eval_generations": generations.report(trainer.args.output_dir) if generations else None,
    }


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated when on a GPU, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def write_summary(output_dir: str, summary: dict[str, Any]) -> Path:
    return write_text_atomic(
        Path(output_dir) / RUN_SUMMARY_NAME, json.dumps(summary, indent=2, default=str) + "\n"
    )


def _loss(value: Any) -> str:
    """Four decimals, as the progress lines print losses (the summary file keeps the exact value)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def summary_line(summary: dict[str, Any]) -> str:
    where = summary.get("save_model_dir") or "not saved (no --save_model_dir)"
    return (
        f"done: {summary['steps']} steps, {summary['trained_tokens']} trained tokens in "
        f"{summary['train_seconds']:.1f}s ({summary['trained_tokens_per_second']:.1f} tokens/s), "
        f"final loss {_loss(summary['final_loss'])}, peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB; "
        f"model: {where}"
    )
