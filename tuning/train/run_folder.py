"""One owner for ``output_dir``: :class:`RunFolder` holds its contract for a run, and the cleanup and
rotation of what runs leave there.

The contract (the process that writes ``output_dir``: rank 0, or each node's with
``--save_on_each_node``; on the other ranks it is a no-op):

- one writer at a time: the lock (``tuning/lock.py``), held from start to end;
- at start, what earlier runs left that is provably unfinished is removed, saying so
  (:func:`clean_output_dir`);
- this run's records (``resolved_config.yaml``, ``training_logs.jsonl``, tracker links) go to
  ``.pending/`` and replace the last run's only at this run's first commit (``tuning/train/records.py``);
- a run that succeeds promotes its records and removes an earlier run's ``error.log`` (a stale
  "interrupted: stopped by SIGTERM at step 101" must not outlive the resumed run that finished);
- a run that fails before it has anything to show (before training wrote a log line or a checkpoint:
  a bad resume, an engine mismatch, a signal during start-up) leaves the folder as it found it: its
  ``.pending/`` is removed, and the lock file and the folder too when this run created them. Only the
  debris any start removes stays removed. The failure's one line then goes to stderr and
  ``$TERMINATION_LOG_FILE``, and into ``output_dir/error.log`` only when the folder existed before
  (``tuning/errors.py``). Mistakes found before the folder is touched (flags, data files, data config)
  never reach it: the entry point checks them first.

Rotation: Hugging Face's ``rotate_checkpoints`` runs inside ``_save_checkpoint`` *before* we can write
the marker, orders by mtime, and counts incomplete folders; ``_finalize_training`` with
``save_total_limit=1`` deletes every checkpoint but the best one, the newest included. So the trainer
hides ``save_total_limit`` from it and calls :func:`prune_checkpoints` after each commit instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

from tuning.config import SFTConfig, save_resolved_config
from tuning.errors import ERROR_LOG_NAME, UserError
from tuning.files import delete_folder, remove_staging_folders, remove_tombstones, remove_unfinished_writes
from tuning.lock import OutputDirLock
from tuning.train.checkpoint_format import (
    COMPLETE_MARKER,
    IN_PROGRESS,
    TRAINER_STATE,
    checkpoint_step,
    complete_checkpoints,
    discard_checkpoint,
    is_complete,
    latest_complete_checkpoint,
    list_checkpoints,
    read_marker,
)
from tuning.train.records import (
    RUN_ID_NAME,
    START_RECORDS,
    pending_dir,
    pending_run_id,
    promote_pending,
    settle_pending,
    start_pending,
)
from tuning.train.resume import explicit_checkpoint

logger = logging.getLogger(__name__)


class RunFolder:
    """``with RunFolder(config):`` around a run: the lock, the start-of-run cleanup, the pending records
    and their promotion, and the folder left as found when the run fails before training (see the
    module docstring)."""

    def __init__(self, config: SFTConfig) -> None:
        self.config = config
        self.path = Path(config.train.output_dir)
        self._lock: OutputDirLock | None = None
        self.run_id: str | None = None
        self._records_at_start = {RUN_ID_NAME, *START_RECORDS}

    def __enter__(self) -> RunFolder:
        args = self.config.train
        if not args.should_save:
            return self
        lock = OutputDirLock(self.path, args.wait_for_output_dir)
        lock.acquire()
        self._lock = lock
        try:
            clean_output_dir(self.path, keep=explicit_checkpoint(args), final_dir=args.save_model_dir)
            self.run_id = start_pending(self.path)  # the checkpoints this run commits carry it
            self._records_at_start.add(save_resolved_config(self.config, pending_dir(self.path)).name)
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._lock is None:
            return
        as_found = False
        try:
            if exc_type is None:
                promote_pending(self.path)
                (self.path / ERROR_LOG_NAME).unlink(missing_ok=True)  # an earlier run's failure: superseded
            elif not self.has_run():
                if self.run_id is not None and pending_run_id(self.path) == self.run_id:
                    delete_folder(pending_dir(self.path))
                as_found = True
        finally:
            self._lock.release(remove=as_found)
            self._lock = None

    def has_run(self) -> bool:
        """Whether this run left something to keep: a checkpoint (its records were promoted then) or a
        record beyond the resolved config (a training log line, a tracker's link)."""
        if self.run_id is None:
            return False  # it failed while starting
        if pending_run_id(self.path) != self.run_id:
            return True  # promoted at its first commit
        return any(p.name not in self._records_at_start for p in pending_dir(self.path).iterdir())


def clean_output_dir(
    output_dir: str | Path, keep: Path | None = None, final_dir: str | Path | None = None
) -> list[Path]:
    """At start, with the output_dir lock held: remove what earlier runs left that is provably
    unfinished, saying so. Returns the checkpoint folders removed.

    - tombstones (``.deleting-*``): deletions a kill interrupted; ``.NAME.tmp`` files: replacements
      of a file (``training_logs.jsonl``, ``run_summary.json``) a kill interrupted;
    - ``checkpoint-N`` without a marker that was marked in progress, or has no ``trainer_state.json``:
      saves a kill interrupted (``keep``, a folder asked for with ``--resume_from_checkpoint PATH``, is
      left alone). An unmarked folder with ``trainer_state.json`` and no in-progress mark may be a whole
      checkpoint written by another tool: never auto-resumed, never deleted;
    - an in-progress mark left inside a committed checkpoint;
    - ``.pending/``: finished if a committed checkpoint carries its run id, else discarded
      (``tuning/train/records.py``);
    - half-built final model folders beside ``final_dir`` (``--save_model_dir``).
    """
    for tombstone in remove_tombstones(output_dir):
        logger.warning("finished deleting %s (a kill interrupted its deletion)", tombstone)
    for leftover in remove_unfinished_writes(output_dir):
        logger.warning(
            "removed %s (a write a kill interrupted; the file it was replacing is intact)", leftover
        )
    removed = []
    for folder in list_checkpoints(output_dir):
        if is_complete(folder):
            (folder / IN_PROGRESS).unlink(missing_ok=True)
            continue
        if keep is not None and folder.resolve() == keep.resolve():
            continue
        if (folder / TRAINER_STATE).is_file() and not (folder / IN_PROGRESS).exists():
            logger.warning(
                "ignoring %s: no %s (written by another tool, or by an older version killed before its "
                "commit); resume from it only with --resume_from_checkpoint PATH",
                folder,
                COMPLETE_MARKER,
            )
            continue
        logger.warning("removing incomplete checkpoint %s (a save was interrupted)", folder)
        discard_checkpoint(folder)
        removed.append(folder)
    run_ids = {read_marker(p).get("run_id") for p in complete_checkpoints(output_dir)}
    settle_pending(output_dir, {r for r in run_ids if r})
    for leftover in remove_staging_folders(final_dir) if final_dir else []:
        logger.warning("removed %s: a final model save a kill interrupted", leftover)
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
    write (left by a run restarted with ``false`` or from an earlier PATH, or damaged ones skipped at
    the start); auto-resume would otherwise pick them. Rotation never deletes the newest complete
    checkpoint nor ``best_checkpoint``.
    """
    complete = complete_checkpoints(output_dir)
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
        logger.debug("deleting checkpoint %s", folder)  # what --save_total_limit asked for: not news
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
