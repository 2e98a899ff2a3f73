"""User errors and internal failures, and how the entry point reports them.

Every user-facing failure is raised as ``UserError("what; where; how to fix")`` at the point where the
fact is known and rendered once by the entry point: one line on stderr, exit code 1, and the same line
appended to the termination log. Anything else is an internal failure (exit 203).
"""

from __future__ import annotations

import os
from pathlib import Path

USER_ERROR_EXIT_CODE = 1
INTERNAL_ERROR_EXIT_CODE = 203
# Stopped by SIGTERM/SIGINT after writing a checkpoint: 128 + signal number, the shell convention
# (143 for SIGTERM, 130 for SIGINT); rerunning the same command resumes. See docs/checkpoints.md.
SIGTERM_EXIT_CODE = 143
SIGINT_EXIT_CODE = 130


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad data, bad path). Exit code 1, no traceback."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal after committing a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def termination_log_path(output_dir: str | None) -> Path | None:
    """Where the one-line failure reason goes: ``$TERMINATION_LOG_FILE`` (the Kubernetes convention is
    /dev/termination-log), else ``output_dir/error.log`` when output_dir is (or can be) a directory."""
    env = os.environ.get("TERMINATION_LOG_FILE")
    if env:
        return Path(env)
    if not output_dir:
        return None
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        return None
    return out / "error.log"


def write_termination_log(line: str, output_dir: str | None) -> None:
    """Append ``line`` to the termination log; never raises (we are already failing)."""
    path = termination_log_path(output_dir)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
    except OSError:
        pass


EXCERPT_CHARS = 80


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """A short, quoted, one-line excerpt of data for an error message: data files may hold secrets, and
    error lines end up in logs and termination logs, so no message quotes more than ``limit`` characters
    of a row (``'first words...' (1234 chars)``)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"
