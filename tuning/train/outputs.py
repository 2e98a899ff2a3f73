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
from tuning.model.peft import write_adapter_extras
from tuning.train.checkpoints import fsync_dir, fsync_file
from tuning.train.distributed import barrier, full_state_dict

logger = logging.getLogger(__name__)

RUN_SUMMARY_NAME = "run_summary.json"


def save_final_model(trainer: Any, tokenizer: Any, save_dir: str, plan: PrecisionPlan) -> Path:
    """Write the final model (safetensors, config, generation config, tokenizer) to ``save_dir``.

    Files are written to a temporary sibling folder, flushed to disk, then the folder is renamed to
    ``save_dir`` in one step; when ``save_dir`` already exists (a rerun, or ``save_dir == output_dir``)
    the files are renamed in one by one. Either way a crash mid-save never leaves a half-written model
    file where a loader would pick it up.
    """
    target = Path(save_dir)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # keep_fp32_wrapper=False also strips the autocast wrapper accelerate put on forward: training is
    # over, and the model in memory should compute like the saved one when reloaded
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    if plan.save_dtype != plan.load_dtype:
        # training is over: cast in place (halves memory) so the saved weights use the requested dtype
        model.to(plan.save_dtype)
    model.config.dtype = plan.save_dtype
    with full_state_dict(trainer):  # under FSDP every rank joins the gather; the Trainer writes on rank 0
        trainer.save_model(str(tmp))  # for an adapter (PeftModel) this writes the adapter only
    if not trainer.args.should_save:  # the other ranks only took part in the gather
        barrier()
        return target
    write_adapter_extras(model, tmp)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; resolved_config.yaml holds the args
    for item in tmp.iterdir():
        (fsync_dir if item.is_dir() else fsync_file)(item)
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        barrier()  # released only once the model is in place: no rank reloads or reports it earlier
        return target
    for item in tmp.iterdir():
        os.replace(item, target / item.name)
    tmp.rmdir()
    barrier()
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
