"""The final model folder: written whole or not at all."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tuning.files import is_disk_full, publish_folder, staging_folder
from tuning.model import PrecisionPlan, save_processor, write_adapter_extras
from tuning.train import barrier, full_state_dict, out_of_space

logger = logging.getLogger(__name__)


def save_final_model(trainer: Any, tokenizer: Any, save_dir: str, plan: PrecisionPlan) -> Path:
    """Write the final model (safetensors, config, generation config, tokenizer) to ``save_dir``.

    Files are written to a temporary sibling folder, flushed to disk, then the folder is renamed to
    ``save_dir`` in one step; when ``save_dir`` already exists (a rerun, or ``save_dir == output_dir``)
    the files are renamed in one by one. Either way a crash mid-save never leaves a half-written model
    file where a loader would pick it up.
    """
    target = Path(save_dir)
    tmp = staging_folder(target)
    try:
        return _write_final_model(trainer, tokenizer, target, tmp, plan)
    except Exception as e:
        if not is_disk_full(e, tmp):
            raise
        writing = f"the final model to {target}"
        raise out_of_space(
            tmp, trainer.args.output_dir, discard=trainer.args.should_save, writing=writing
        ) from None


def _write_final_model(trainer: Any, tokenizer: Any, target: Path, tmp: Path, plan: PrecisionPlan) -> Path:
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
    if hasattr(tokenizer, "image_processor"):  # an image-text model's processor (and chat template)
        save_processor(tokenizer, tmp)
    else:
        tokenizer.save_pretrained(str(tmp))
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; resolved_config.yaml holds the args
    publish_folder(tmp, target)
    barrier()
    return target
