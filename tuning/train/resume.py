"""The resume decision, in one place: which checkpoint this run continues from, and whether it may.

``--resume_from_checkpoint`` unset or ``true``: the newest complete checkpoint in ``output_dir`` whose
files are intact (a damaged one is named and skipped); ``false``: none; a path: that folder, which must
be intact. Then the checkpoint must fit this run (``tuning/train/fingerprint.py``):

- another model (parameter names or shapes) is a user error, whatever was asked: loading would fail;
- other settings (batch, data, seed, precision, optimizer...) or a checkpoint without optimizer state
  are refused on auto-resume, naming each change: the job would silently become another one. Passing
  the checkpoint's path explicitly continues anyway, with a warning. A checkpoint without optimizer
  state is resumed with a warning when this run has ``--save_only_model`` itself;
- the engine (FSDP, DeepSpeed, neither) and, for DeepSpeed, the number of processes must be the ones
  that wrote it (:func:`check_resumable`, called by the trainer, which knows its engine).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tuning.errors import UserError
from tuning.train.checkpoint_format import (
    COMPLETE_MARKER,
    TRAINER_STATE,
    checkpoint_layout,
    checkpoint_world_size,
    complete_checkpoints,
    has_optimizer_state,
    is_complete,
    list_checkpoints,
    read_marker,
    verify_checkpoint,
)
from tuning.train.fingerprint import layout_change, model_mismatch, setting_changes

logger = logging.getLogger(__name__)


def resume_mode(args: object) -> str:
    """``true``, ``false`` or ``path`` for ``--resume_from_checkpoint``."""
    value = getattr(args, "resume_from_checkpoint", None)
    mode = str(value).strip().lower() if value is not None else "true"
    return mode if mode in ("true", "false") else "path"


def explicit_checkpoint(args: object) -> Path | None:
    """The folder ``--resume_from_checkpoint PATH`` names, if a path was given."""
    return Path(str(args.resume_from_checkpoint)) if resume_mode(args) == "path" else None


def resume_checkpoint(args: object, fingerprint: dict[str, Any] | None = None) -> str | None:
    """The checkpoint this run continues from (None: step 0), after checking it; logs one line."""
    output_dir = str(getattr(args, "output_dir", ""))
    mode = resume_mode(args)
    if mode == "false":
        if list_checkpoints(output_dir):
            logger.info(
                "starting over (--resume_from_checkpoint false); old checkpoints stay until the first save"
            )
        return None
    if mode == "path":
        checkpoint = _explicit_checkpoint(str(args.resume_from_checkpoint))
    else:
        checkpoint = newest_intact_checkpoint(output_dir)
        if checkpoint is None:
            logger.info("no complete checkpoint in %s: starting from step 0", output_dir)
            return None
    state = _read_state(checkpoint)
    check_fits(checkpoint, args, fingerprint, explicit=mode == "path")
    logger.info(
        "resuming from %s: step %s, epoch %.4g", checkpoint, state.get("global_step"), state.get("epoch") or 0
    )
    return str(checkpoint)


def newest_intact_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose files pass :func:`verify_checkpoint`; damaged newer ones
    are named in a warning. Raises when every complete checkpoint is damaged: starting over would
    quietly throw away the run, and the damage may be the storage's, not the checkpoints'."""
    damaged = []
    for checkpoint in reversed(complete_checkpoints(output_dir)):
        problem = verify_checkpoint(checkpoint)
        if problem is None:
            for name, why in damaged:
                logger.warning(
                    "%s is damaged (%s): resuming from %s, the newest intact checkpoint, instead",
                    name,
                    why,
                    checkpoint.name,
                )
            return checkpoint
        damaged.append((checkpoint.name, problem))
    if damaged:
        listed = "; ".join(f"{name}: {why}" for name, why in damaged)
        raise UserError(
            f"every complete checkpoint in {output_dir} is damaged ({listed}); restore them from a copy, "
            "or pass --resume_from_checkpoint false to start over"
        )
    return None


def check_fits(checkpoint: Path, args: object, fingerprint: dict[str, Any] | None, *, explicit: bool) -> None:
    """Refuse (or, for an explicit path, warn about) a checkpoint that doesn't continue this run."""
    recorded = read_marker(checkpoint).get("fingerprint") or {}
    changes: list[str] = []
    if fingerprint is not None and not recorded:
        logger.info(
            "%s records no fingerprint (written by an older version or another tool): not checking that "
            "the model, data and settings are the same",
            checkpoint.name,
        )
    elif fingerprint is not None:
        mismatch = model_mismatch(recorded, fingerprint)
        if mismatch:
            raise UserError(
                f"{checkpoint.name} was written for a model with {mismatch[0]}; this model has "
                f"{mismatch[1]}. Resume with the model and adapter settings it was trained with, or pass "
                "--resume_from_checkpoint false to start over"
            )
        changes = setting_changes(recorded, fingerprint)
        layout = layout_change(recorded, fingerprint)
        if layout and not any(c.startswith("effective_batch") for c in changes):
            logger.info("%s: the same effective batch, formed as %s", checkpoint.name, layout)
    if not has_optimizer_state(checkpoint):
        if getattr(args, "save_only_model", False):
            logger.warning(
                "%s has no optimizer state (--save_only_model): the optimizer starts afresh, so the "
                "run continues, inexactly",
                checkpoint.name,
            )
        else:
            changes.append(
                "optimizer state: none in the checkpoint (--save_only_model, or its files were removed), "
                "so the optimizer would start afresh"
            )
    if not changes:
        return
    listed = "; ".join(changes)
    if explicit:
        logger.warning(
            "resuming from %s as asked, although it is not the same run: %s; the result will differ from "
            "an uninterrupted run",
            checkpoint,
            listed,
        )
        return
    raise UserError(
        f"{checkpoint.name} was written by a different run: {listed}. Rerun with its settings, pass "
        f"--resume_from_checkpoint {checkpoint} to continue from it anyway, or --resume_from_checkpoint "
        "false to start over"
    )


def _read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(
            f"checkpoint {checkpoint} has no readable {TRAINER_STATE} ({e}); "
            "--resume_from_checkpoint; pass a complete checkpoint folder, or 'false' to start over"
        ) from e


def _explicit_checkpoint(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise UserError(
            f"--resume_from_checkpoint {value}: no such folder; pass a checkpoint-N folder, "
            "'true' (latest complete one in --output_dir) or 'false' (start over)"
        )
    if not is_complete(path):
        logger.warning("%s has no %s; resuming anyway because it was asked for", path, COMPLETE_MARKER)
    problem = verify_checkpoint(path)
    if problem:
        raise UserError(
            f"--resume_from_checkpoint {value} is damaged: {problem}; pass another checkpoint, 'true' (the "
            "newest intact one in --output_dir) or 'false' (start over)"
        )
    return path


def check_resumable(checkpoint: str | None, fsdp: bool, deepspeed: bool, world_size: int) -> None:
    """Refuse, with the fix, a resume the engines would fail on (Hugging Face raises a ValueError deep in
    ``train``, or silently starts the optimizer afresh); log a change in the number of processes.

    FSDP checkpoints, sharded or full, reshard onto any number of processes (torch.distributed.checkpoint
    and FSDP's full state dict both do; tested 2 -> 4 -> 2); DeepSpeed's ZeRO checkpoints load only on the
    world size that wrote them (other sizes need DeepSpeed's universal-checkpoint conversion).
    """
    if not checkpoint:
        return
    layout, written_by = checkpoint_layout(checkpoint), checkpoint_world_size(checkpoint)
    engine = "FSDP" if layout.startswith("fsdp") else "DeepSpeed" if layout == "deepspeed" else None
    running = "FSDP" if fsdp else "DeepSpeed" if deepspeed else None
    if engine != running and (engine or running == "DeepSpeed"):
        how = {
            "FSDP": "accelerate launch --config_file fixtures/accelerate_fsdp_defaults.yaml (any number of processes)",
            "DeepSpeed": f"accelerate launch with a DeepSpeed config and {written_by} processes",
            None: "the launch that wrote it (no FSDP or DeepSpeed config)",
        }[engine]
        raise UserError(
            f"{checkpoint} was written {f'under {engine}' if engine else 'without FSDP or DeepSpeed'} and "
            f"this run uses {running or 'neither'}; resume it with {how}, or pass "
            "--resume_from_checkpoint false to start over"
        )
    if written_by == world_size:
        return
    if engine == "DeepSpeed":
        raise UserError(
            f"{checkpoint} is a DeepSpeed checkpoint of {written_by} processes and this run has {world_size}; "
            f"DeepSpeed resumes ZeRO checkpoints on the same number of processes: launch {written_by}, or "
            "pass --resume_from_checkpoint false to start over"
        )
    logger.info(
        "resuming a checkpoint of %d processes on %d: FSDP reshards the model and optimizer; keep "
        "per_device_train_batch_size x gradient_accumulation_steps x processes as it was for an exact resume",
        written_by,
        world_size,
    )
