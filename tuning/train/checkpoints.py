"""Checkpoints a restarted job can trust: commit marker and manifest, verification, crash-safe deletion,
leftovers, rotation, and the Trainer glue (stop on a signal, the carried logging window).

What Hugging Face's ``Trainer`` (transformers 5.x) already does, and what it lacks:

- ``_save_checkpoint`` writes model, optimizer, scheduler, RNG states and ``trainer_state.json`` straight
  into ``checkpoint-N``; a kill mid-save leaves a ``checkpoint-N`` that ``get_last_checkpoint`` still
  picks (it only matches the folder name) and resume then fails on. We keep its writer, mark the folder
  in progress before it writes, and commit it after: every file fsynced, then a marker written last that
  lists every file's size. A checkpoint is complete iff it has the marker; it is intact iff its files
  still match the marker (:func:`verify_checkpoint`).
- ``rotate_checkpoints`` runs inside ``_save_checkpoint`` *before* we can write the marker, orders by
  mtime, and counts incomplete folders; ``_finalize_training`` with ``save_total_limit=1`` deletes every
  checkpoint but the best one, the newest included. So the trainer hides ``save_total_limit`` from it and
  calls :func:`prune_checkpoints` after each commit instead.
- ``train()`` resets the logging window (the loss summed since the last log line), so after a resume
  the first line averaged fewer steps than the uninterrupted run's: the marker carries the window.
- Every deletion renames the folder to a tombstone first (:func:`tuning.files.delete_folder`), so a kill
  mid-deletion never leaves a half-deleted ``checkpoint-N`` that looks like a checkpoint.

Which private Trainer methods this relies on, and why: ``tuning/train/hf_private.py``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import struct
import zipfile
from pathlib import Path
from typing import Any

from accelerate.utils.constants import FSDP_MODEL_NAME
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tuning.errors import TrainingInterrupted, UserError
from tuning.files import (
    ATOMIC_WRITE_SUFFIX,
    delete_folder,
    fsync_dir,
    fsync_file,
    is_disk_full,
    refused_pickle,
    remove_staging_folders,
    remove_tombstones,
    remove_unfinished_writes,
    write_text_atomic,
)
from tuning.train import hf_private
from tuning.train.distributed import per_rank
from tuning.train.records import pending_run_id, promote_pending, settle_pending
from tuning.train.signals import StopOnSignal, interrupted_exit_code

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete.json"
IN_PROGRESS = ".checkpoint_in_progress"
TRAINER_STATE = "trainer_state.json"
_NOT_IN_MANIFEST = {COMPLETE_MARKER, IN_PROGRESS, f".{COMPLETE_MARKER}{ATOMIC_WRITE_SUFFIX}"}


def checkpoint_step(path: str | Path) -> int | None:
    """N of a ``checkpoint-N`` folder name, else None."""
    name = Path(path).name
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        return int(name[len(prefix) :])
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders in ``output_dir``, by step (not mtime: copies and some filesystems lie)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    return [p for p in list_checkpoints(output_dir) if is_complete(p)]


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    complete = complete_checkpoints(output_dir)
    return complete[-1] if complete else None


def read_marker(path: str | Path) -> dict[str, Any]:
    """The marker's record (``{}`` when absent or unreadable)."""
    try:
        value = json.loads((Path(path) / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# --- writing: in progress, then committed ---------------------------------------------------------


def begin_checkpoint(path: str | Path) -> Path:
    """Before anything is written: empty the folder (another history's, or a leftover) and mark it in
    progress, so a kill from here to the commit leaves a folder the next start can prove incomplete."""
    folder = Path(path)
    delete_folder(folder)
    folder.mkdir(parents=True)
    info = {"pid": os.getpid(), "host": socket.gethostname()}
    (folder / IN_PROGRESS).write_text(json.dumps(info) + "\n", encoding="utf-8")
    fsync_dir(folder)
    return folder


def resumed_step(checkpoint: str | None) -> int:
    """The global step a run resumed from ``checkpoint`` starts at (0 for a fresh run)."""
    if not checkpoint:
        return 0
    state = Path(checkpoint) / TRAINER_STATE
    if state.is_file():
        return int(json.loads(state.read_text(encoding="utf-8")).get("global_step") or 0)
    return checkpoint_step(checkpoint) or 0


def commit_checkpoint(path: str | Path, step: int, epoch: float | None, record: dict | None = None) -> Path:
    """Flush every file of ``path`` to disk, then write the marker (atomically, last): the step, the size
    of every file, and ``record`` (what the trainer carries across a resume). Call once, on the rank
    that writes, after every rank has written its files."""
    folder = Path(path)
    sizes = {}
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.name not in _NOT_IN_MANIFEST:
            fsync_file(file)
            sizes[file.relative_to(folder).as_posix()] = file.stat().st_size
    for sub in (p for p in folder.rglob("*") if p.is_dir()):
        fsync_dir(sub)
    marker = {"step": step, "epoch": epoch, **(record or {}), "files": sizes}
    write_text_atomic(folder / COMPLETE_MARKER, json.dumps(marker) + "\n")
    (folder / IN_PROGRESS).unlink(missing_ok=True)
    fsync_dir(folder)
    return folder


def discard_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint folder; a kill halfway leaves a tombstone, never a damaged checkpoint."""
    delete_folder(path)


# --- verifying: cheap enough for a 70B checkpoint -------------------------------------------------


def has_optimizer_state(path: str | Path) -> bool:
    """Whether the checkpoint holds optimizer and scheduler state, as Hugging Face's loader looks for
    it (``optimizer.pt``/``.bin``, an FSDP ``optimizer_*`` folder, or a DeepSpeed ``global_step*`` one)."""
    folder = Path(path)
    if any(p.is_dir() and p.name.startswith("global_step") for p in folder.iterdir()):
        return True  # DeepSpeed keeps optimizer and scheduler together
    optimizer = (folder / "optimizer.pt").is_file() or (folder / "optimizer.bin").is_file()
    optimizer = optimizer or any(p.is_dir() and "optimizer" in p.name for p in folder.iterdir())
    return optimizer and (folder / "scheduler.pt").is_file()


def verify_checkpoint(path: str | Path) -> str | None:
    """What is wrong with a checkpoint's files, or None when they are intact.

    Cheap on any size: every file's size against the marker's manifest (a stat each), the header of
    every ``.safetensors`` file against its length (reads a few KB), the zip directory of every torch
    file (``.pt``/``.pth``/``.bin``; reads its end), ``trainer_state.json`` parsed. That finds truncated,
    missing and resized files; not flipped bits, nor a file replaced by one of the same size, which
    would take reading every byte (minutes for a 70B checkpoint with its optimizer state).
    """
    folder = Path(path)
    for name, size in (read_marker(folder).get("files") or {}).items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size:,} bytes, {size:,} when it was committed"
    for file in sorted(folder.rglob("*")):
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
        elif file.suffix in (".pt", ".pth", ".bin"):
            problem = _torch_file_problem(file)
        elif file.name == TRAINER_STATE:
            problem = _json_problem(file)
        else:
            continue
        if problem:
            return f"{file.relative_to(folder).as_posix()} {problem}"
    return None


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is cut short ({size} bytes)"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"is cut short: {size:,} bytes, its header alone is {header_len:,}"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return "has an unreadable header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        return (
            f"is {'cut short: ' if size < expected else ''}{size:,} bytes, its header describes {expected:,}"
        )
    return None


def _torch_file_problem(file: Path) -> str | None:
    with open(file, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None  # the legacy (non-zip) torch format: nothing cheap to check
    try:
        with zipfile.ZipFile(file) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"is damaged ({e})"
    return None


def _json_problem(file: Path) -> str | None:
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"is unreadable ({e})"
    return None


# --- what killed runs leave behind ----------------------------------------------------------------


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


# --- the Trainer glue ------------------------------------------------------------------------------


def checkpoint_layout(path: str | Path) -> str:
    """Which engine wrote ``path``: ``"fsdp-sharded"`` (a ``torch.distributed.checkpoint`` folder per
    model/optimizer), ``"fsdp-full"`` (``pytorch_model_fsdp.bin``), ``"deepspeed"`` (``global_stepN/``),
    or ``"plain"`` (one process, DDP)."""
    folder = Path(path)
    if any(p.is_dir() and p.name.startswith(f"{FSDP_MODEL_NAME}_") for p in folder.iterdir()):
        return "fsdp-sharded"
    if (folder / f"{FSDP_MODEL_NAME}.bin").is_file():
        return "fsdp-full"
    if any(p.is_dir() for p in folder.glob("global_step*")):
        return "deepspeed"
    return "plain"


def checkpoint_world_size(path: str | Path) -> int:
    """How many processes wrote ``path``: each rank saves its own ``rng_state_{rank}.pth``."""
    return max(1, len(list(Path(path).glob("rng_state_*.pth"))))


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


class SafeCheckpointsMixin(hf_private.PrivateTrainerHooks):
    """Trainer methods (mix in before ``transformers.Trainer``): committed checkpoints that carry what a
    resume needs, our rotation, and the stop-on-signal protocol (:class:`CheckpointProtocol`).
    Everything else of the save is Hugging Face's own writer.

    ``fingerprint`` (``tuning/train/fingerprint.py``) is recorded in every marker when set;
    ``trained_tokens`` (kept by the subclass) is carried across a resume.
    """

    fingerprint: dict | None = None
    trained_tokens: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop = StopOnSignal()
        self.stopped_on: int | None = None
        self.last_saved_step = -1
        self.written_steps: set[int] = set()
        self.resumed_from: str | None = None
        self.resumed_step = 0  # the step of resumed_from (read once: rotation keeps what came before it)
        self.trained_tokens_at_start = 0
        self._checkpoint_limit: int | None = None
        self.add_callback(CheckpointProtocol(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:  # HF would take an unmarked, possibly half-written folder
            latest = latest_complete_checkpoint(self.args.output_dir)
            resume_from_checkpoint = str(latest) if latest else None
        self.resumed_from = str(resume_from_checkpoint) if resume_from_checkpoint else None
        self.resumed_step = resumed_step(self.resumed_from)
        check_resumable(
            self.resumed_from, self.is_fsdp_enabled, self.is_deepspeed_enabled, self.args.world_size
        )
        load_best = self.args.load_best_model_at_end
        try:
            with hf_private.hf_rotation_disabled(self) as limit, self.stop.installed():
                self._checkpoint_limit = limit
                result = super().train(resume_from_checkpoint, *args, **kwargs)
                if self.stopped_on is not None and self.last_saved_step != self.state.global_step:
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
        if self.stopped_on is not None:
            name = signal.Signals(self.stopped_on).name
            raise TrainingInterrupted(
                f"stopped by {name} at step {self.state.global_step} after saving "
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}; rerun the same command to resume",
                interrupted_exit_code(self.stopped_on),
            )
        return result

    def request_stop(self, args: TrainingArguments, control: TrainerControl) -> None:
        """Stop after this step if a stop signal came (asked on every rank: a collective)."""
        signum = self.stop.requested(args.device)
        if signum is None or self.stopped_on is not None:
            return
        self.stopped_on = signum
        control.should_training_stop = True
        # the run exits 143/130 after its checkpoint; loading the best model at the end would only
        # spend the grace period (the resumed run loads it when it finishes)
        args.load_best_model_at_end = False

    def before_checkpoint_write(self, folder: Path) -> bool:
        if self.state.global_step == self.last_saved_step:
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
            self.written_steps.add(self.state.global_step)
            # this run has a checkpoint now: its records replace the earlier run's
            promote_pending(self.args.output_dir)
            prune_checkpoints(
                folder.parent,
                self._checkpoint_limit,
                self.state.best_model_checkpoint,
                self.resumed_step,
                self.written_steps,
            )
        self.last_saved_step = self.state.global_step

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
        self.trained_tokens_at_start = self.trained_tokens


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
        if trainer.resumed_from:
            trainer.restore_from_record(read_marker(trainer.resumed_from))
        else:
            trainer.trained_tokens_at_start = trainer.trained_tokens

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
        stopped = self.trainer.stopped_on is not None
        if stopped and not ends_epoch(state):
            control.should_log = control.should_evaluate = False
        if stopped or self.deferred_save:
            control.should_save = True
        self.deferred_save = False
        if self.trainer.last_saved_step == state.global_step:
            control.should_save = False
