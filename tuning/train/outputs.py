"""Outputs: the final model folder and the run summary."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from tuning.model import PrecisionPlan

logger = logging.getLogger(__name__)

RUN_SUMMARY_NAME = "run_summary.json"


def save_final_model(trainer: Any, tokenizer: Any, save_dir: str, plan: PrecisionPlan) -> Path:
    """Write the final model (safetensors, config, generation config, tokenizer) to ``save_dir``.

    Files are written to a temporary sibling folder and then renamed into place one by one, so a crash
    mid-save never leaves a half-written model file where a loader would pick it up.
    """
    target = Path(save_dir)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if plan.save_dtype != plan.load_dtype:
        # training is over: cast in place (halves memory) so the saved weights use the requested dtype
        model.to(plan.save_dtype)
    model.config.dtype = plan.save_dtype
    trainer.save_model(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; resolved_config.yaml holds the args
    target.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        os.replace(item, target / item.name)
    tmp.rmdir()
    return target


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated when on a GPU, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def write_summary(output_dir: str, summary: dict[str, Any]) -> Path:
    path = Path(output_dir) / RUN_SUMMARY_NAME
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def summary_line(summary: dict[str, Any]) -> str:
    where = summary.get("save_model_dir") or "not saved (no --save_model_dir)"
    return (
        f"done: {summary['steps']} steps, {summary['trained_tokens']} trained tokens in "
        f"{summary['train_seconds']:.1f}s ({summary['trained_tokens_per_second']:.1f} tokens/s), "
        f"final loss {summary['final_loss']}, peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB; "
        f"model: {where}"
    )
