"""What a person watching the run reads: logging set-up, start-of-run lines, the end summary."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import datasets
import transformers

from tuning.config import SFTConfig
from tuning.data import PreparedData
from tuning.model import PrecisionPlan
from tuning.train.outputs import peak_memory_bytes

logger = logging.getLogger("tuning")


def setup_logging(argv: list[str]) -> bool:
    """Our INFO lines on stderr; the libraries' warnings only. Returns whether ``--log_level debug``."""
    debug = any(a in ("debug", "--log_level=debug") for a in argv) and any(
        a.startswith("--log_level") for a in argv
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
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
        config.data.training_data_path,
        data.data_format,
        stats.kept,
        stats.rows,
        stats.total_tokens,
        stats.trained_tokens,
        effective,
    )
    logger.info("outputs: %s (model: %s)", Path(args.output_dir).resolve(), args.save_model_dir or "none")


def build_summary(trainer: Any, result: Any, seconds: float, data: PreparedData, saved: Path | None) -> dict:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    return {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_seconds": round(seconds, 3),
        "trained_tokens": trainer.trained_tokens,
        "trained_tokens_per_second": trainer.trained_tokens / seconds if seconds > 0 else 0.0,
        "final_loss": losses[-1] if losses else result.training_loss,
        "mean_train_loss": result.training_loss,
        "best_validation_loss": min(evals) if evals else None,
        "peak_memory_bytes": peak_memory_bytes(),
        "rows": data.stats.rows,
        "rows_kept": data.stats.kept,
        "save_model_dir": str(saved) if saved else None,
        "output_dir": trainer.args.output_dir,
    }
