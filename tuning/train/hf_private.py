"""Every use of ``transformers.Trainer``'s private surface (transformers 5.x), in one file.

Everything else we add to the Trainer goes through public callbacks and methods (``on_train_begin``,
``on_step_end``, ``on_epoch_end``, ``on_evaluate``, ``train``, ``log``, ``compute_loss``). What no public
hook can do:

| need | private surface | why no public hook does it |
| --- | --- | --- |
| train nothing when resumed at ``max_steps`` (a mid-epoch checkpoint made transformers 5.24 train on to the epoch's end) | ``Trainer._run_epoch(...)`` | no hook runs before an epoch's first micro-batch can be skipped |
| empty and mark the checkpoint folder before the Trainer writes it; commit it (marker) before any ``on_save`` callback sees it | ``Trainer._save_checkpoint(model, trial)`` | ``on_save`` runs after the files are written, and with ``save_strategy best`` the decision to save is taken after evaluating, past every callback |
| Hugging Face's own rotation off (it runs before our marker, counts unmarked folders, and with ``save_total_limit 1`` deletes the newest checkpoint at the end) | ``args.save_total_limit``, read inside ``_save_checkpoint`` and ``_finalize_training`` | no switch for it |
| save the step a stop signal came at when the Trainer's own decision skipped it (``save_strategy best`` overrides ``should_save`` after evaluating) | ``Trainer._save_checkpoint`` called directly | no public "save now" |
| redo an optimizer step after a micro-batch ran out of memory (``--oom_recovery``): the step's micro-batches, to run the earlier ones again | ``Trainer.get_batch_samples(epoch_iterator, num_batches, device)`` (undocumented; called once per step by ``_run_epoch``, which then hands each of the returned objects to ``training_step``) | ``training_step`` sees one micro-batch; no hook sees the step's list |
| load a full-weights checkpoint of an image-text model on resume (``Trainer`` loads ``model.safetensors`` with ``load_state_dict(strict=False)``, and transformers 5.25 saves Qwen2.5-VL / LLaVA checkpoints in their hub layout, whose keys differ from the module's: nothing loaded, one warning) | ``Trainer._load_from_checkpoint(resume_from_checkpoint, model)`` | no hook runs between loading the weights and training |
| carry the partial logging window across a resume | ``Trainer._tr_loss`` and ``Trainer._globalstep_last_logged`` | the logged loss is ``_tr_loss / (global_step - _globalstep_last_logged)``; ``train()`` resets both just before ``on_train_begin`` |

``tests/test_hf_private.py`` pins each of these (signatures, and the behaviour we rely on) and fails
naming the method when transformers changes it: then update this file, nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


class PrivateTrainerHooks:
    """Mixin (before ``transformers.Trainer``) for the two private methods we override.

    ``_save_checkpoint`` runs between two methods of ours: ``before_checkpoint_write(folder)`` may
    return False to skip the save; ``after_checkpoint_write`` runs on every rank once the Trainer has
    written its files; ``checkpoint_write_failed(folder, error)`` sees what either raised. The folder is ``output_dir/checkpoint-N`` (hyperparameter search, which puts
    runs in subfolders, is not supported).

    ``_run_epoch`` trains nothing once ``max_steps`` is reached: resumed from the run's last checkpoint
    (a rerun after a stop at the last step, or a kill during the final save), transformers 5.24 trains
    on past ``max_steps`` to the end of the epoch when that checkpoint is mid-epoch.
    """

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        folder = checkpoint_folder(self)
        if not self.before_checkpoint_write(folder):
            return
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
            self.after_checkpoint_write(folder)
        except Exception as e:
            self.checkpoint_write_failed(folder, e)
            raise

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        if 0 < self.state.max_steps <= self.state.global_step:  # type: ignore[attr-defined]
            return
        super()._run_epoch(*args, **kwargs)  # type: ignore[misc]

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]
        self.step_micro_batches = batches  # tuning/train/oom.py runs the earlier ones again after an OOM
        self.split_micro_batches: dict[int, list] = {}
        return batches, num_items

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        self.after_checkpoint_load(Path(resume_from_checkpoint), model)

    def before_checkpoint_write(self, folder: Path) -> bool:
        return True

    def after_checkpoint_load(self, folder: Path, model: Any) -> None:
        """Runs once the Trainer has loaded a checkpoint's model weights (on resume)."""

    def after_checkpoint_write(self, folder: Path) -> None:
        pass

    def checkpoint_write_failed(self, folder: Path, error: Exception) -> None:
        """Called with what the save raised; raise another error to replace it (else it propagates)."""


def save_checkpoint_now(trainer: Any) -> None:
    """Save a checkpoint of the current step outside the Trainer's own decision, as it does itself."""
    trainer._save_checkpoint(trainer.model_wrapped, None)
    trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)


def checkpoint_folder(trainer: Any) -> Path:
    """Where ``_save_checkpoint`` writes the checkpoint of the current step."""
    return Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"


@contextlib.contextmanager
def hf_rotation_disabled(trainer: Any) -> Iterator[int | None]:
    """Hide ``save_total_limit`` from the Trainer for the block; yields the limit for our own rotation."""
    limit = trainer.args.save_total_limit
    trainer.args.save_total_limit = None
    try:
        yield limit
    finally:
        trainer.args.save_total_limit = limit


def logging_window(trainer: Any) -> tuple[float, int]:
    """(this rank's loss sum since the last log, the step of the last log)."""
    return float(trainer._tr_loss.item()), int(trainer._globalstep_last_logged)


def restore_logging_window(trainer: Any, loss_sum: float, last_logged_step: int) -> None:
    """Put back a window saved by :func:`logging_window`; call from ``on_train_begin``. The float32
    tensor is filled in place (the training loop holds a reference to it) with a value that came out of
    a float32 tensor, so the next logged loss is bit-identical to the uninterrupted run's."""
    trainer._tr_loss.fill_(loss_sum)
    trainer._globalstep_last_logged = last_logged_step
