"""A run's records in ``output_dir`` (``resolved_config.yaml``, ``training_logs.jsonl``, the trackers'
``<name>_tracker.json`` links) are replaced only once the new run has something to replace them with.

A rerun that fails, or is killed before its first checkpoint, must leave the previous run's records as
they were: its ``training_logs.jsonl`` is the history of the checkpoints still in the folder, its
``resolved_config.yaml`` says how to rerun them. So a run writes such files to ``output_dir/.pending/``
(with a ``run_id``) and moves them into place (one ``os.replace`` each) right after it commits its
first checkpoint (whose marker records the same ``run_id``), or when it ends without one
(``--save_strategy no``, data processing only).

At the next start, a ``.pending/`` whose ``run_id`` a complete checkpoint carries is a promotion a kill
interrupted: it is finished. Any other ``.pending/`` belongs to a run that ended before its first
checkpoint: it is discarded (it stays until then, for a look at what the failed run wrote). A run that
fails before training wrote anything removes its own ``.pending/`` as it exits
(:class:`tuning.train.run_folder.RunFolder`), and one killed then leaves it for the next start.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from tuning.files import delete_folder, fsync_dir

logger = logging.getLogger(__name__)

PENDING_DIR = ".pending"
RUN_ID_NAME = "run_id"
# the data audit a run writes before it trains: pending like the other records (a rerun that fails keeps
# the last run's audit beside the last run's checkpoints), but no sign that the run got anywhere, so a
# run that fails before training still leaves the folder as found (RunFolder.has_run)
AUDIT_JSON_NAME = "data_audit.json"
AUDIT_HTML_NAME = "data_audit.html"
START_RECORDS = (AUDIT_JSON_NAME, AUDIT_HTML_NAME)


def pending_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / PENDING_DIR


def start_pending(output_dir: str | Path) -> str:
    """Open this run's pending records; returns the run id the checkpoints it commits will carry."""
    pending = pending_dir(output_dir)
    pending.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex
    (pending / RUN_ID_NAME).write_text(run_id + "\n", encoding="utf-8")
    return run_id


def pending_run_id(output_dir: str | Path) -> str | None:
    """The id of the run whose records are still pending, if any."""
    try:
        return (pending_dir(output_dir) / RUN_ID_NAME).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def new_record_path(output_dir: str | Path, name: str) -> Path:
    """Where this run writes a record it makes whole (a tracker's run link): into ``.pending/`` while
    this run has one, else ``output_dir``."""
    pending = pending_dir(output_dir)
    return pending / name if pending.is_dir() else Path(output_dir) / name


def record_path(output_dir: str | Path, name: str) -> Path:
    """Where this run writes record ``name``: its pending copy until promoted, then the real one."""
    pending = pending_dir(output_dir) / name
    return pending if pending.exists() else Path(output_dir) / name


def promote_pending(output_dir: str | Path) -> list[str]:
    """Move every pending record into ``output_dir``; returns their names (a no-op once done)."""
    pending = pending_dir(output_dir)
    if not pending.is_dir():
        return []
    moved = []
    for item in sorted(pending.iterdir()):
        if item.name.startswith("."):  # a write a kill interrupted (write_text_atomic's temporary)
            item.unlink()
        elif item.name != RUN_ID_NAME:
            os.replace(item, Path(output_dir) / item.name)
            moved.append(item.name)
    fsync_dir(Path(output_dir))
    (pending / RUN_ID_NAME).unlink(missing_ok=True)  # last: until here a restart can finish the job
    pending.rmdir()
    return moved


def settle_pending(output_dir: str | Path, committed_run_ids: set[str]) -> None:
    """At start: finish an interrupted promotion, or discard the records of a run that never committed."""
    pending = pending_dir(output_dir)
    if not pending.exists():
        return
    run_id = pending_run_id(output_dir)
    if run_id is not None and run_id in committed_run_ids:
        moved = promote_pending(output_dir)
        logger.warning(
            "finished moving %s into %s (a kill interrupted it)", ", ".join(moved) or "records", output_dir
        )
        return
    names = sorted(p.name for p in pending.iterdir() if p.name != RUN_ID_NAME) if pending.is_dir() else []
    logger.warning(
        "discarding %s (%s): records of an earlier run that stopped before its first checkpoint",
        pending,
        ", ".join(names) or "empty",
    )
    delete_folder(pending)
