"""Checkpoints a restarted job can trust: commit marker, leftovers, rotation, and the resume decision.

What Hugging Face's ``Trainer`` (transformers 5.x) already does, and what it lacks:

- ``_save_checkpoint`` writes model, optimizer, scheduler, RNG states and ``trainer_state.json`` straight
  into ``checkpoint-N``; a kill mid-save leaves a ``checkpoint-N`` that ``get_last_checkpoint`` still
  picks (it only matches the folder name) and resume then fails on. We keep its writer and add a commit
  marker written last, after every file is fsynced: a checkpoint is complete iff it has the marker.
- ``rotate_checkpoints`` runs inside ``_save_checkpoint`` *before* we can write the marker, orders by
  mtime, and counts incomplete folders; ``_finalize_training`` with ``save_total_limit=1`` deletes every
  checkpoint but the best one, the newest included. So the trainer hides ``save_total_limit`` from it and
  calls :func:`prune_checkpoints` after each commit instead.
- ``train(resume_from_checkpoint=True)`` raises when there is no checkpoint; the scheduler re-running the
  same command needs "resume if there is something to resume, else start": :func:`resume_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tuning.errors import TrainingInterrupted, UserError
from tuning.files import fsync_dir, fsync_file, is_disk_full, refused_pickle
from tuning.train.signals import StopOnSignal, interrupted_exit_code

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_step(path: str | Path) -> int | None:
    """N of a ``checkpoint-N`` folder name, else None."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders in ``output_dir``, by step (not mtime: copies and some filesystems lie)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    complete = [p for p in list_checkpoints(output_dir) if is_complete(p)]
    return complete[-1] if complete else None


def commit_checkpoint(path: str | Path, step: int, epoch: float | None) -> Path:
    """Flush every file of ``path`` to disk, then write the completion marker (atomically, last)."""
    folder = Path(path)
    for file in folder.rglob("*"):
        if file.is_file():
            fsync_file(file)
    tmp = folder / f".{COMPLETE_MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "epoch": epoch}) + "\n", encoding="utf-8")
    fsync_file(tmp)
    os.replace(tmp, folder / COMPLETE_MARKER)
    fsync_dir(folder)
    return folder


def discard_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint folder, marker first, so a kill halfway never leaves a 'complete' remnant."""
    folder = Path(path)
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def remove_incomplete(output_dir: str | Path, keep: Path | None = None) -> list[Path]:
    """Delete the leftovers of killed saves (no marker, no ``trainer_state.json``), with a warning.

    An unmarked folder that does have ``trainer_state.json`` may be a whole checkpoint written by another
    tool: it is left alone (never auto-resumed; pass it as ``--resume_from_checkpoint PATH``).
    """
    removed = []
    for folder in list_checkpoints(output_dir):
        if is_complete(folder) or (keep is not None and folder.resolve() == keep.resolve()):
            continue
        if (folder / TRAINER_STATE).is_file():
            logger.warning(
                "ignoring %s: no %s (killed before its commit, or written by another tool); "
                "resume from it only with --resume_from_checkpoint PATH",
                folder,
                COMPLETE_MARKER,
            )
            continue
        logger.warning("removing incomplete checkpoint %s (a save was interrupted)", folder)
        discard_checkpoint(folder)
        removed.append(folder)
    return removed


def prune_checkpoints(
    output_dir: str | Path,
    save_total_limit: int | None,
    best_checkpoint: str | None,
    resumed_step: int,
    written_steps: set[int],
) -> list[Path]:
    """Delete checkpoints of abandoned histories, then the oldest beyond ``save_total_limit``.

    Abandoned: complete checkpoints later than the step this run started from that this run did not
    write (left by a run restarted with ``false`` or from an earlier PATH); auto-resume would otherwise
    pick them. Rotation never deletes the newest complete checkpoint nor ``best_checkpoint``.
    """
    complete = [p for p in list_checkpoints(output_dir) if is_complete(p)]
    deleted = []
    for folder in complete:
        step = checkpoint_step(folder) or 0
        if step > resumed_step and step not in written_steps:
            deleted.append(folder)
    kept = [p for p in complete if p not in deleted]
    if save_total_limit and save_total_limit > 0 and kept:
        best = Path(best_checkpoint).resolve() if best_checkpoint else None
        protected = {kept[-1].resolve(), best}
        excess = len(kept) - max(save_total_limit, len([p for p in kept if p.resolve() in protected]))
        for folder in kept:
            if excess <= 0:
                break
            if folder.resolve() not in protected:
                deleted.append(folder)
                excess -= 1
    for folder in deleted:
        logger.info("deleting checkpoint %s", folder)
        discard_checkpoint(folder)
    return deleted


def out_of_space(
    partial: str | Path, output_dir: str | Path, *, discard: bool, writing: str | None = None
) -> UserError:
    """The error for a disk that filled up while writing ``partial`` (a checkpoint folder, or the final
    model's temporary folder; ``writing`` names it for the user): the partial folder is removed (it
    frees space, and could never be resumed) and the message names the newest complete checkpoint,
    which a rerun resumes from. Exit code 1: the environment needs fixing, not the job."""
    folder = Path(partial)
    if discard:
        discard_checkpoint(folder)
    intact = latest_complete_checkpoint(output_dir)
    kept = f"{intact.name} is intact" if intact else "no earlier checkpoint exists"
    return UserError(
        f"no space left on device writing {writing or folder}; {kept} and the partial files were removed; "
        "free space (or lower --save_total_limit) and rerun the same command to resume"
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
    return path


def resume_checkpoint(args: object) -> str | None:
    """The checkpoint this run continues from, from ``--resume_from_checkpoint`` and ``output_dir``.

    Unset or ``true``: the latest complete checkpoint in ``output_dir``, if any. ``false``: none (old
    checkpoints stay until this run commits its first). Anything else: that folder. Logs one line.
    """
    value = getattr(args, "resume_from_checkpoint", None)
    output_dir = str(getattr(args, "output_dir", ""))
    mode = str(value).strip().lower() if value is not None else "true"
    if mode == "false":
        if list_checkpoints(output_dir):
            logger.info(
                "starting over (--resume_from_checkpoint false); old checkpoints stay until the first save"
            )
        return None
    checkpoint = None if mode == "true" else _explicit_checkpoint(str(value))
    state = _read_state(checkpoint) if checkpoint else {}
    if getattr(args, "should_save", True):
        remove_incomplete(output_dir, keep=checkpoint)
    if checkpoint is None:
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is None:
            logger.info("no complete checkpoint in %s: starting from step 0", output_dir)
            return None
        state = _read_state(checkpoint)
    logger.info(
        "resuming from %s: step %s, epoch %.4g", checkpoint, state.get("global_step"), state.get("epoch") or 0
    )
    return str(checkpoint)


def _resumed_step(checkpoint: str | None) -> int:
    if not checkpoint:
        return 0
    state_file = Path(checkpoint) / TRAINER_STATE
    if state_file.is_file():
        return int(json.loads(state_file.read_text(encoding="utf-8")).get("global_step") or 0)
    return checkpoint_step(checkpoint) or 0


class SafeCheckpointsMixin:
    """Trainer methods (mix in before ``transformers.Trainer``): committed checkpoints, our rotation,
    and the stop-on-signal protocol. Everything else of the save is Hugging Face's own writer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stop = StopOnSignal()
        self._stopped_on: int | None = None
        self._last_saved_step = -1
        self._written_steps: set[int] = set()
        self._resumed_from_step = 0
        self._checkpoint_limit: int | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:  # HF would take an unmarked, possibly half-written folder
            latest = latest_complete_checkpoint(self.args.output_dir)
            resume_from_checkpoint = str(latest) if latest else None
        self._resumed_from_step = _resumed_step(resume_from_checkpoint or None)
        self._checkpoint_limit = self.args.save_total_limit
        self.args.save_total_limit = None  # HF's rotation runs before our marker; we rotate after it
        try:
            with self._stop.installed():
                result = super().train(resume_from_checkpoint, *args, **kwargs)
        except pickle.UnpicklingError as e:  # a checkpoint's optimizer/scheduler/RNG state
            refused = refused_pickle(
                e,
                f"checkpoint {resume_from_checkpoint}",
                "resume from another one (--resume_from_checkpoint PATH) or start over (false)",
            )
            if refused is None:
                raise
            raise refused from None
        finally:
            self.args.save_total_limit = self._checkpoint_limit
        if self._stopped_on is not None:
            name = signal.Signals(self._stopped_on).name
            raise TrainingInterrupted(
                f"stopped by {name} at step {self.state.global_step} after saving "
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}; rerun the same command to resume",
                interrupted_exit_code(self._stopped_on),
            )
        return result

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        step = self.state.global_step
        folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if step == self._last_saved_step:
            return  # a stop signal already saved this step; the epoch-end save would only repeat it
        if self.args.should_save and folder.exists():
            discard_checkpoint(folder)  # a leftover or another history's: never mix its files with ours
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's shards are written before the marker
            if self.args.should_save:
                commit_checkpoint(folder, step, self.state.epoch)
        except Exception as e:
            if not is_disk_full(e, folder):
                raise
            raise out_of_space(folder, self.args.output_dir, discard=self.args.should_save) from None
        if self.args.should_save:
            self._written_steps.add(step)
            prune_checkpoints(
                folder.parent,
                self._checkpoint_limit,
                self.state.best_model_checkpoint,
                self._resumed_from_step,
                self._written_steps,
            )
        self._last_saved_step = step

    def _maybe_log_save_evaluate(
        self, tr_loss: Any, grad_norm: Any, model: Any, trial: Any, *args: Any, **kwargs: Any
    ) -> None:
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, *args, **kwargs)
        # called by HF right after each optimizer step (and at epoch end): the step is finished here
        signum = self._stop.requested(self.args.device)
        if signum is None or self._stopped_on is not None:
            return
        if self._last_saved_step != self.state.global_step:
            self._save_checkpoint(model, trial)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        self._stopped_on = signum
        self.control.should_training_stop = True
