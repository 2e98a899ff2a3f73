"""What a person watching the run reads: logging set-up, start-of-run lines, progress, the end summary
(also ``output_dir/run_summary.json``)."""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import datasets
import transformers
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuning.config import SFTConfig
from tuning.data import PreparedData
from tuning.model import PrecisionPlan
from tuning.plot import LOSS_PLOT_NAME
from tuning.trackers import TrackerCallback
from tuning.train.checkpoints import is_complete, list_checkpoints
from tuning.train.distributed import per_rank
from tuning.train.outputs import peak_memory_bytes

logger = logging.getLogger("tuning")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time, so repeated in-process runs (tests, notebooks)
    never write to a stream that was replaced and closed since set-up."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_logging(argv: list[str]) -> bool:
    """Our INFO lines on stderr; the libraries' warnings only. Returns whether ``--log_level debug``."""
    debug = any(a in ("debug", "--log_level=debug") for a in argv) and any(
        a.startswith("--log_level") for a in argv
    )
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug and int(os.environ.get("RANK", "0")) > 0:  # the other ranks would repeat rank 0's lines
        logger.setLevel(logging.WARNING)
    transformers.logging.set_verbosity_info() if debug else transformers.logging.set_verbosity_warning()
    datasets.logging.set_verbosity_warning()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    return debug


def log_run_start(
    config: SFTConfig, model: Any, data: PreparedData, trainer: Any, plan: PrecisionPlan
) -> None:
    args = config.train
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = data.stats
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    logger.info(
        "model %s: %s weights, computing in %s, attention %s, %d/%d parameters trainable",
        config.model.model_name_or_path,
        str(plan.load_dtype).removeprefix("torch."),
        str(plan.autocast or plan.load_dtype).removeprefix("torch."),
        model.config._attn_implementation,
        trainable,
        total,
    )
    logger.info(
        "data %s (%s): %d rows kept of %d, %d tokens, %d trained; effective batch %d",
        config.data.training_data_path or config.data.data_config_path,
        data.data_format,
        stats.kept,
        stats.rows,
        stats.total_tokens,
        stats.trained_tokens,
        effective,
    )
    logger.info("outputs: %s (model: %s)", Path(args.output_dir).resolve(), args.save_model_dir or "none")


def build_summary(trainer: Any, result: Any, seconds: float, data: PreparedData, saved: Path | None) -> dict:
    """Every number a person asks about after a run; ``run_summary.json`` is this dict."""
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    out = Path(trainer.args.output_dir)
    trackers = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TrackerCallback)), None)
    tokens = sum(per_rank(trainer.trained_tokens))  # each rank counted its own batches; all ranks call this
    return {
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_seconds": round(seconds, 3),
        "trained_tokens": tokens,
        "trained_tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "peak_memory_bytes": peak_memory_bytes(),
        "final_loss": losses[-1] if losses else result.training_loss,
        "best_loss": min(losses) if losses else result.training_loss,
        "mean_train_loss": result.training_loss,
        "final_validation_loss": evals[-1] if evals else None,
        "best_validation_loss": min(evals) if evals else None,
        "rows": data.stats.rows,
        "rows_kept": data.stats.kept,
        "output_dir": str(out),
        "checkpoints": [str(p) for p in list_checkpoints(out) if is_complete(p)],
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "save_model_dir": str(saved) if saved else None,
        "loss_plot": str(out / LOSS_PLOT_NAME) if (out / LOSS_PLOT_NAME).is_file() else None,
        "trackers": dict(trackers.run_ids) if trackers else {},
    }


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class RunProgress(TrainerCallback):
    """Progress on rank 0: a bar on a terminal (steps, epoch, loss, tokens/s, ETA); on anything else (CI,
    Kubernetes logs) one plain line per log step and at least every ``every_seconds``.

    Replaces transformers' own progress callback, which prints every raw log dict under its bar and
    rewrites carriage-return frames into files that are not terminals.
    """

    def __init__(self, tty: bool | None = None, every_seconds: float = 60.0) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.every_seconds = every_seconds
        self.bar: Any = None
        self.values: dict[str, float] = {}
        self._start = self._last_line = 0.0
        self._first_step = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        self._start = self._last_line = time.perf_counter()
        self._first_step = state.global_step
        logger.info(
            "training: %d steps, %g epochs, logging %s, saving %s",
            state.max_steps,
            state.num_train_epochs,
            _every(args.logging_strategy, args.logging_steps),
            _every(args.save_strategy, args.save_steps),
        )
        if state.global_step:
            logger.info("resumed from step %d of %d", state.global_step, state.max_steps)
        if self.tty:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="training",
                unit="step",
                file=sys.stderr,
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        elif state.is_world_process_zero and time.perf_counter() - self._last_line >= self.every_seconds:
            logger.info(self.line(state))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        if not state.is_world_process_zero or not ({"loss", "eval_loss"} & logs.keys()):
            return
        self.values.update({k: float(logs[k]) for k in ("loss", "eval_loss", "trained_tokens") if k in logs})
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(state), refresh=True)
        else:
            logger.info(self.line(state))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def postfix(self, state: TrainerState) -> str:
        parts = [f"epoch {float(state.epoch or 0):.2f}"]
        if "loss" in self.values:
            parts.append(f"loss {self.values['loss']:.4f}")
        if "eval_loss" in self.values:
            parts.append(f"eval_loss {self.values['eval_loss']:.4f}")
        elapsed = time.perf_counter() - self._start
        if "trained_tokens" in self.values and elapsed > 0:
            parts.append(f"{self.values['trained_tokens'] / elapsed:.0f} tokens/s")
        return " | ".join(parts)

    def line(self, state: TrainerState) -> str:
        self._last_line = now = time.perf_counter()
        elapsed, done = now - self._start, state.global_step - self._first_step
        eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
        pct = 100 * state.global_step / state.max_steps if state.max_steps else 0
        return (
            f"step {state.global_step}/{state.max_steps} ({pct:.0f}%) | {self.postfix(state)} | "
            f"elapsed {_clock(elapsed)} | ETA {_clock(eta) if eta is not None else '?'}"
        )


def _every(strategy: Any, steps: float) -> str:
    name = getattr(strategy, "value", strategy)
    return f"every {steps:g} steps" if name == "steps" else ("never" if name == "no" else f"every {name}")
