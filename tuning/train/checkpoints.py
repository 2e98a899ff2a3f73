"""The Trainer glue for checkpoints a restarted job can trust: :class:`SafeCheckpointsMixin` (commit each
checkpoint with what a resume needs, our rotation, stop on a signal) and its public-hook half
:class:`CheckpointProtocol`; what they know about the run is one :class:`TrainingProgress`.

What Hugging Face's ``Trainer`` (transformers 5.x) lacks, and where we add it: the commit marker and
verification (``tuning/train/checkpoint_format.py``), rotation and cleanup
(``tuning/train/run_folder.py``), whether a run may resume from a checkpoint
(``tuning/train/resume.py``). Here: ``train()`` resets the logging window (the loss summed since the last
log line), so after a resume the first line averaged fewer steps than the uninterrupted run's: the
marker carries the window, and the trained-token count.

Which private Trainer methods this relies on, and why: ``tuning/train/hf_private.py``.
"""

from __future__ import annotations

import logging
import pickle
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tuning.errors import TrainingInterrupted
from tuning.files import is_disk_full, refused_pickle
from tuning.train import hf_private
from tuning.train.checkpoint_format import (
    begin_checkpoint,
    commit_checkpoint,
    latest_complete_checkpoint,
    read_marker,
    resumed_step,
)
from tuning.train.distributed import per_rank
from tuning.train.records import pending_run_id, promote_pending
from tuning.train.resume import check_resumable
from tuning.train.run_folder import out_of_space, prune_checkpoints
from tuning.train.signals import StopOnSignal, interrupted_exit_code

logger = logging.getLogger(__name__)


@dataclass
class TrainingProgress:
    """What the checkpoint glue knows about this run beyond the Trainer's ``state`` (torchtune's
    ``TrainingProgress`` is the model): where it resumed from, what it has saved, why it stops, and what
    a resume of it must carry and match."""

    fingerprint: dict[str, Any] | None = None  # recorded in every marker (tuning/train/fingerprint.py)
    trained_tokens: int = 0  # this rank's, resumes included (counted by the subclass)
    tokens_at_start: int = 0  # trained_tokens when this process started training
    resumed_from: str | None = None  # the checkpoint this run continues
    resumed_step: int = 0  # its step, read once: rotation keeps what came before it
    stopped_on: int | None = None  # the signal a stop was agreed on
    last_saved_step: int = -1
    written_steps: set[int] = field(default_factory=set)  # the checkpoints this run committed
    checkpoint_limit: int | None = None  # save_total_limit, hidden from Hugging Face's rotation


class SafeCheckpointsMixin(hf_private.PrivateTrainerHooks):
    """Trainer methods (mix in before ``transformers.Trainer``): committed checkpoints that carry what a
    resume needs, our rotation, and the stop-on-signal protocol (:class:`CheckpointProtocol`).
    Everything else of the save is Hugging Face's own writer.

    What it knows about the run is ``self.progress`` (:class:`TrainingProgress`); ``fingerprint`` and
    ``trained_tokens`` (kept by the subclass) are read and set through it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.progress = TrainingProgress()
        super().__init__(*args, **kwargs)
        self.stop = StopOnSignal()
        self.add_callback(CheckpointProtocol(self))

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return self.progress.fingerprint

    @fingerprint.setter
    def fingerprint(self, value: dict[str, Any] | None) -> None:
        self.progress.fingerprint = value

    @property
    def trained_tokens(self) -> int:
        return self.progress.trained_tokens

    @trained_tokens.setter
    def trained_tokens(self, value: int) -> None:
        self.progress.trained_tokens = value

    @property
    def trained_tokens_at_start(self) -> int:
        return self.progress.tokens_at_start

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:  # HF would take an unmarked, possibly half-written folder
            latest = latest_complete_checkpoint(self.args.output_dir)
            resume_from_checkpoint = str(latest) if latest else None
        progress = self.progress
        progress.resumed_from = str(resume_from_checkpoint) if resume_from_checkpoint else None
        progress.resumed_step = resumed_step(progress.resumed_from)
        check_resumable(
            progress.resumed_from, self.is_fsdp_enabled, self.is_deepspeed_enabled, self.args.world_size
        )
        load_best = self.args.load_best_model_at_end
        try:
            with hf_private.hf_rotation_disabled(self) as limit, self.stop.installed():
                progress.checkpoint_limit = limit
                result = super().train(resume_from_checkpoint, *args, **kwargs)
                if progress.stopped_on is not None and progress.last_saved_step != self.state.global_step:
                    hf_private.save_checkpoint_now(self)  # the step's save was skipped (save_strategy best)
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
            self.args.load_best_model_at_end = load_best
        if progress.stopped_on is not None:
            name = signal.Signals(progress.stopped_on).name
            raise TrainingInterrupted(
                f"stopped by {name} at step {self.state.global_step} after saving "
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}; rerun the same command to resume",
                interrupted_exit_code(progress.stopped_on),
            )
        return result

    def request_stop(self, args: TrainingArguments, control: TrainerControl) -> None:
        """Stop after this step if a stop signal came (asked on every rank: a collective)."""
        signum = self.stop.requested(args.device)
        if signum is None or self.progress.stopped_on is not None:
            return
        self.progress.stopped_on = signum
        control.should_training_stop = True
        # the run exits 143/130 after its checkpoint; loading the best model at the end would only
        # spend the grace period (the resumed run loads it when it finishes)
        args.load_best_model_at_end = False

    def before_checkpoint_write(self, folder: Path) -> bool:
        if self.state.global_step == self.progress.last_saved_step:
            return False  # saved already (at the step, then asked again at the epoch end or on a stop)
        if self.args.should_save:
            begin_checkpoint(folder)
        self.accelerator.wait_for_everyone()  # no rank writes into the folder before it is fresh
        return True

    def after_checkpoint_write(self, folder: Path) -> None:
        self.accelerator.wait_for_everyone()  # every rank's files are written before the marker
        record = self.resume_record()  # collective: every rank takes part
        if self.args.should_save:
            run_id = pending_run_id(self.args.output_dir)
            if run_id:  # the first commit: a restart that finds .pending with this id finishes promoting it
                record["run_id"] = run_id
            commit_checkpoint(folder, self.state.global_step, self.state.epoch, record)
        # every rank waits for the commit: a rank that left first and exited 143 makes torch's elastic
        # agent SIGTERM the machine's other ranks and SIGKILL them 30 s later, rank 0 mid-commit included
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self.progress.written_steps.add(self.state.global_step)
            # this run has a checkpoint now: its records replace the earlier run's
            promote_pending(self.args.output_dir)
            prune_checkpoints(
                folder.parent,
                self.progress.checkpoint_limit,
                self.state.best_model_checkpoint,
                self.progress.resumed_step,
                self.progress.written_steps,
            )
        self.progress.last_saved_step = self.state.global_step

    def checkpoint_write_failed(self, folder: Path, error: Exception) -> None:
        if is_disk_full(error, folder):  # a user's problem with a clear fix, not a crash of ours
            raise out_of_space(folder, self.args.output_dir, discard=self.args.should_save) from None

    def resume_record(self) -> dict[str, Any]:
        """What the next run needs beyond Hugging Face's files, gathered from every rank: the partial
        logging window, the trained-token count, the fingerprint."""
        loss_sum, last_logged = hf_private.logging_window(self)
        return {
            "logging_window": {"loss_sum": per_rank(loss_sum), "last_logged_step": last_logged},
            "trained_tokens": per_rank(self.trained_tokens),
            "fingerprint": self.fingerprint,
        }

    def mean_train_loss(self) -> float | None:
        """The mean loss over every step of the run, resumes included: the log lines weighted by the
        steps each averages, plus the window after the last one. (Hugging Face's ``training_loss``
        averages only this process's steps.) Collective: every rank calls it."""
        total, previous = 0.0, 0
        for record in self.state.log_history:
            if "loss" in record and "step" in record:
                total += record["loss"] * (record["step"] - previous)
                previous = record["step"]
        remainders = per_rank(hf_private.logging_window(self)[0])
        total += sum(remainders) / len(remainders)
        return total / self.state.global_step if self.state.global_step else None

    def restore_from_record(self, record: dict[str, Any]) -> None:
        """Put back what :meth:`resume_record` saved (called at ``on_train_begin``)."""
        rank, ranks = self.args.process_index, self.args.world_size
        window = record.get("logging_window") or {}
        sums = window.get("loss_sum") or []
        if sums and window.get("last_logged_step") is not None:
            # the logged loss is the mean over ranks of each rank's sum: with as many ranks, each gets
            # its own (bit-exact); with another count, each gets the mean (same mean, inexact anyway)
            loss_sum = sums[rank] if len(sums) == ranks else sum(sums) / len(sums)
            hf_private.restore_logging_window(self, loss_sum, int(window["last_logged_step"]))
        tokens = record.get("trained_tokens") or []
        if tokens:
            self.trained_tokens = tokens[rank] if len(tokens) == ranks else (sum(tokens) if rank == 0 else 0)
        self.progress.tokens_at_start = self.trained_tokens


def ends_epoch(state: TrainerState) -> bool:
    """Whether the step just taken is its epoch's last (or the run's): the epoch-end log line,
    evaluation and save follow it."""
    return float(state.epoch or 0).is_integer() or state.global_step >= state.max_steps


class CheckpointProtocol(TrainerCallback):
    """Public-hook half of :class:`SafeCheckpointsMixin` (registered after Hugging Face's flow callback).

    - ``on_train_begin``: put back the logging window and token count the resumed checkpoint carries.
    - A checkpoint holds the state after everything its step logs: Hugging Face saves a step-scheduled
      checkpoint at the step, before the epoch-end log line and evaluation when the step also ends the
      epoch (or the run); resumed from, it would carry a window that line already emptied. So such a
      save is moved to the epoch end, after them (``on_step_end`` → ``on_epoch_end``).
    - ``on_step_end`` (and ``on_evaluate``, for a signal during an evaluation): a SIGTERM/SIGINT, agreed
      by all ranks, stops training after this step; the step's own scheduled log, evaluation and save
      happen first, as in an uninterrupted run. The checkpoint for the stop is saved at the epoch end
      that follows at once; mid-epoch with no epoch-end log line or evaluation (the uninterrupted run
      has none at this step; after the resume they would be extra lines in the log).
    """

    def __init__(self, trainer: SafeCheckpointsMixin) -> None:
        self.trainer = trainer
        self.deferred_save = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        trainer = self.trainer
        if trainer.progress.resumed_from:
            trainer.restore_from_record(read_marker(trainer.progress.resumed_from))
        else:
            trainer.progress.tokens_at_start = trainer.trained_tokens

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.trainer.request_stop(args, control)
        if control.should_save and ends_epoch(state):
            control.should_save, self.deferred_save = False, True

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step > 0:
            self.trainer.request_stop(args, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        stopped = self.trainer.progress.stopped_on is not None
        if stopped and not ends_epoch(state):
            control.should_log = control.should_evaluate = False
        if stopped or self.deferred_save:
            control.should_save = True
        self.deferred_save = False
        if self.trainer.progress.last_saved_step == state.global_step:
            control.should_save = False
