"""The on-disk checkpoint: the commit marker and its manifest, and verification.

What Hugging Face's ``Trainer`` (transformers 5.x) lacks, and this adds: ``_save_checkpoint`` writes
model, optimizer, scheduler, RNG states and ``trainer_state.json`` straight into ``checkpoint-N``; a kill
mid-save leaves a ``checkpoint-N`` that ``get_last_checkpoint`` still picks (it only matches the folder
name) and resume then fails on. We keep its writer, mark the folder in progress before it writes
(:func:`begin_checkpoint`), and commit it after (:func:`commit_checkpoint`): every file fsynced, then a
marker written last that lists every file's size and carries what a resume needs beyond Hugging Face's
files. A checkpoint is complete iff it has the marker; it is intact iff its files still match the marker
(:func:`verify_checkpoint`). Deletions go through a tombstone (:func:`tuning.files.delete_folder`), so a
kill mid-deletion never leaves a half-deleted ``checkpoint-N`` that looks like a checkpoint.

Cleanup and rotation: ``tuning/train/run_folder.py``; the Trainer glue: ``tuning/train/checkpoints.py``;
whether a run may resume from a checkpoint: ``tuning/train/resume.py``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import zipfile
from pathlib import Path
from typing import Any

from accelerate.utils.constants import FSDP_MODEL_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tuning.files import ATOMIC_WRITE_SUFFIX, delete_folder, fsync_dir, fsync_file, write_text_atomic

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


# --- which engine wrote it ------------------------------------------------------------------------


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
