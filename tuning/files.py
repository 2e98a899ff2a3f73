"""Neutral file helpers every stage may use: reading YAML/JSON mappings (also a job handed over in the
environment, fms-hf-tuning's convention), durable writes, and deletions that a kill cannot leave
half-done.

Nothing here knows about configs, data or models; it imports only :mod:`tuning.errors`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml

from tuning.errors import UserError


def read_mapping_file(path: str | Path, what: str, shown: str | None = None) -> dict[str, Any]:
    """The mapping a YAML or JSON file holds (``.json`` is read as JSON, anything else as YAML, both
    without running code), or a UserError naming ``what`` and the file (``shown``: how the user typed it).
    Shared by ``--config``, data configs and launcher job files."""
    file, shown = Path(path), shown or str(path)
    if not file.is_file():
        raise UserError(f"{what} {shown} does not exist; pass an existing YAML or JSON file")
    kind = "JSON" if file.suffix == ".json" else "YAML"
    try:
        text = file.read_text(encoding="utf-8")
        values = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{what} {shown} is not valid {kind}: {' '.join(str(e).split())}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UserError(
            f"{what} {shown} must hold a mapping of keys to values, not a {type(values).__name__}"
        )
    return values


# fms-hf-tuning's job hand-over: a path to the job file, or the job itself as base64-encoded JSON (which wins
# when both are set, as in fms-hf-tuning's sft_trainer). Read by `sft_trainer` (no --config) and `tuning launch`.
JOB_PATH_ENV = "SFT_TRAINER_CONFIG_JSON_PATH"
JOB_TEXT_ENV = "SFT_TRAINER_CONFIG_JSON_ENV_VAR"
JOB_ENVS = (JOB_TEXT_ENV, JOB_PATH_ENV)
# a job file's mapping of `accelerate launch` flags: tuning launch's part; the trainer sets it aside
LAUNCH_ARGS_KEY = "accelerate_launch_args"


def job_from_environment() -> tuple[str, dict[str, Any]] | None:
    """(where it came from, the job mapping) from ``$SFT_TRAINER_CONFIG_JSON_ENV_VAR`` or
    ``$SFT_TRAINER_CONFIG_JSON_PATH``; None when neither is set."""
    text = os.environ.get(JOB_TEXT_ENV, "").strip()
    if text:
        where = f"job ${JOB_TEXT_ENV}"
        return where, decode_job_text(text, where)
    path = os.environ.get(JOB_PATH_ENV, "").strip()
    if path:
        where = f"job file {path} (${JOB_PATH_ENV})"
        return where, read_mapping_file(path, "job file", f"{path} (${JOB_PATH_ENV})")
    return None


def decode_job_text(text: str, where: str) -> dict[str, Any]:
    """A job given as base64-encoded JSON. Never a pickle (older fms-hf-tuning launchers accepted one):
    unpickling runs code."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(
            f"{where} is not base64: encode the job's JSON, e.g. base64.b64encode(json.dumps(job).encode())"
        ) from None
    if raw[:1] == b"\x80":  # the pickle protocol 2+ opcode
        raise UserError(
            f"{where} holds a pickle, which is never loaded (it runs code); encode the job as JSON"
        )
    try:
        values = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where} is not base64-encoded JSON: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise UserError(f"{where} must hold a JSON object of keys to values, not a {type(values).__name__}")
    return values


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # some filesystems (and Windows) can't fsync a directory; the rename is still atomic
    with contextlib.suppress(OSError):
        fsync_file(path)


# weight files of an earlier save that a new save in the same folder does not rewrite must go: a loader
# would otherwise find a stale shard (or a stale full model beside a new adapter)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin*", "adapter_model.bin")


def staging_folder(target: Path) -> Path:
    """An empty sibling of ``target`` to write into before :func:`publish_folder` (same filesystem, so the
    final rename is atomic); a leftover of an earlier attempt by this process is removed."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def publish_folder(tmp: Path, target: Path) -> Path:
    """Put the complete folder ``tmp`` in place as ``target``, so that a crash at any moment leaves either
    the old contents or the new files, never a half-written file where a loader would pick it up.

    Every file is flushed to disk first. A new ``target`` is one rename; an existing folder (a rerun, or
    a model saved into ``output_dir``) gets the new files renamed in one by one (each ``os.replace`` is
    atomic), and weight files of an earlier save that this one doesn't rewrite are removed.
    """
    for item in tmp.rglob("*"):
        if item.is_file():
            fsync_file(item)
    fsync_dir(tmp)
    if target.exists() and not target.is_dir():
        target.unlink()
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return target
    new = {item.name for item in tmp.iterdir()}
    for pattern in WEIGHT_PATTERNS:
        for stale in target.glob(pattern):
            if stale.name not in new:
                stale.unlink()
    for item in tmp.iterdir():
        destination = target / item.name
        if item.is_dir() and destination.is_dir():
            shutil.rmtree(destination)
        os.replace(item, destination)
    tmp.rmdir()
    fsync_dir(target)
    return target


ATOMIC_WRITE_SUFFIX = ".tmp"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` in one step: a kill leaves the old file or the new one, never half
    of either (the temporary sibling it may leave is named ``.NAME.tmp``)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}{ATOMIC_WRITE_SUFFIX}")
    tmp.write_text(text, encoding="utf-8")
    fsync_file(tmp)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return target


# A folder being deleted is first renamed to this prefix + its name: the rename is atomic, so a kill
# during the (long) deletion leaves a folder that is visibly rubbish, never a damaged original.
TOMBSTONE_PREFIX = ".deleting-"


def delete_folder(path: str | Path) -> None:
    """Delete a folder so that a kill at any moment leaves either all of it or a tombstone."""
    folder = Path(path)
    if not folder.exists():
        return
    tombstone = folder.with_name(f"{TOMBSTONE_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, tombstone)
    fsync_dir(folder.parent)
    shutil.rmtree(tombstone, ignore_errors=True)


def remove_tombstones(folder: str | Path) -> list[Path]:
    """Finish the deletions a kill interrupted (see :func:`delete_folder`); returns what was removed."""
    root = Path(folder)
    found = sorted(root.glob(f"{TOMBSTONE_PREFIX}*")) if root.is_dir() else []
    for tombstone in found:
        if tombstone.is_dir():
            shutil.rmtree(tombstone, ignore_errors=True)
        else:
            tombstone.unlink(missing_ok=True)
    return found


def remove_staging_folders(target: str | Path) -> list[Path]:
    """Remove the half-built copies of ``target`` killed runs left (:func:`staging_folder`, any pid)."""
    target = Path(target)
    found = sorted(target.parent.glob(f".{target.name}.tmp-*")) if target.parent.is_dir() else []
    for leftover in found:
        delete_folder(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    return found


def remove_unfinished_writes(folder: str | Path) -> list[Path]:
    """Remove the temporaries of :func:`write_text_atomic` calls a kill interrupted (``.NAME.tmp``)."""
    root = Path(folder)
    found = [p for p in root.glob(f".*{ATOMIC_WRITE_SUFFIX}") if p.is_file()] if root.is_dir() else []
    for leftover in found:
        leftover.unlink(missing_ok=True)
    return sorted(found)
