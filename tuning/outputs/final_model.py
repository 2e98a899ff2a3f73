"""The final model folder: written whole or not at all."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tuning.files import delete_folder, fsync_dir, fsync_file, temporary_sibling
from tuning.model import PrecisionPlan
from tuning.model.peft import write_adapter_extras
from tuning.train.distributed import barrier, full_state_dict

logger = logging.getLogger(__name__)


def save_final_model(trainer: Any, tokenizer: Any, save_dir: str, plan: PrecisionPlan) -> Path:
    """Write the final model (safetensors, config, generation config, tokenizer) to ``save_dir``.

    Files are written to a temporary sibling folder, flushed to disk, then the folder is renamed to
    ``save_dir`` in one step; when ``save_dir`` already exists (a rerun, or ``save_dir == output_dir``)
    the files are renamed in one by one. Either way a crash mid-save never leaves a half-written model
    file where a loader would pick it up.
    """
    target = Path(save_dir)
    tmp = temporary_sibling(target)  # a kill leaves it; the next run's start removes it
    delete_folder(tmp)
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
