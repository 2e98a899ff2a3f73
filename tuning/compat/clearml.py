"""ClearML's private names (2.x), each pinned by ``tests/test_compat.py`` (skipped without clearml)."""

from __future__ import annotations

from typing import Any


def report_from_threads(task_class: Any) -> None:
    """Make ``Task.init`` report from threads in this process instead of an ``os.fork``-ed reporter.

    On Linux ClearML forks its reporter by default (``Task._report_subprocess_enabled``, read from
    ``sdk.development.report_use_subprocess``, a setting with no API). Forking a training process is
    unsafe once other threads run: with wandb's threads alive the forked reporter hangs, keeps the
    repository-detection thread's ``git`` pipe open, and ``Task.close()`` waits 5 minutes for it.
    """
    task_class._report_subprocess_enabled = False
