"""User errors and internal failures, and the one way every command reports them.

Every user-facing failure is raised as ``UserError("what; where; how to fix")`` at the point where the
fact is known, and rendered once by :func:`run_command`, which every subcommand's ``main`` goes
through: one line on stderr, exit code 1, and the same line appended to the termination log. A broken
invariant of ours is an :class:`InternalError` (never an ``assert``, which ``python -O`` removes);
anything else is an internal failure too (exit 203, with the traceback).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

USER_ERROR_EXIT_CODE = 1
INTERNAL_ERROR_EXIT_CODE = 203
# Stopped by SIGTERM/SIGINT: 128 + signal number, the shell convention (143 for SIGTERM, 130 for SIGINT);
# after a checkpoint was written, rerunning the same command resumes. See docs/checkpoints.md.
SIGTERM_EXIT_CODE = 143
SIGINT_EXIT_CODE = 130
# Kubernetes keeps 4 KiB of a container's termination message; several ranks may each append a line.
MAX_LINE_CHARS = 1000
# the termination log in output_dir when $TERMINATION_LOG_FILE is unset; a run that succeeds removes it
ERROR_LOG_NAME = "error.log"


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad data, bad path). Exit code 1, no traceback."""


class InternalError(Exception):
    """An invariant of ours does not hold: a bug in tuning, not the user's doing (exit 203)."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal after committing a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM outside training (where no checkpoint can be written). A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""


def check(condition: object, message: str) -> None:
    """Raise :class:`InternalError` unless ``condition`` holds (an ``assert`` that survives ``-O``)."""
    if not condition:
        raise InternalError(message)


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when it has none."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


def did_you_mean(name: str, candidates: Iterable[str], *, flag: bool = False) -> str:
    """`` (did you mean --x?)`` (``flag``) or `` (did you mean 'x'?)`` for the closest candidate, or ''."""
    match = difflib.get_close_matches(name.lstrip("-") if flag else name, list(candidates), n=1, cutoff=0.6)
    if not match:
        return ""
    return f" (did you mean --{match[0]}?)" if flag else f" (did you mean '{match[0]}'?)"


def clip(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters: a huge value in the middle is cut out, so the
    start (what failed) and the end (how to fix it) both survive."""
    line = " ".join(str(text).split())
    if len(line) <= limit:
        return line
    keep = limit - 5
    return f"{line[: keep * 2 // 3]} ... {line[-(keep - keep * 2 // 3) :]}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse exits 2 with usage text on a bad command line; ours raise a UserError (exit 1, one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"invalid command line: {message}; run with --help for the list of flags")


def termination_log_path(output_dir: str | None) -> Path | None:
    """Where the one-line failure reason goes besides stderr: ``$TERMINATION_LOG_FILE`` (the Kubernetes
    convention is /dev/termination-log), else ``output_dir/error.log`` when output_dir is a folder that
    exists. A command never creates output_dir to report a failure: a run that fails before training
    leaves the folder as it found it (and none where there was none; ``tuning/train/run_folder.py``)."""
    env = os.environ.get("TERMINATION_LOG_FILE")
    if env:
        return Path(env)
    if not output_dir or not Path(output_dir).is_dir():
        return None
    return Path(output_dir) / ERROR_LOG_NAME


def write_termination_log(line: str, output_dir: str | None) -> None:
    """Append ``line`` (clipped to one short line) to the termination log; never raises."""
    path = termination_log_path(output_dir)
    if path is None:
        return
    try:
        if os.environ.get("TERMINATION_LOG_FILE"):  # its folder may be created; output_dir never is
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(clip(line) + "\n")
    except OSError:
        pass


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Until training installs its own handler (which checkpoints first), SIGTERM ends the command
    through the same path as any failure instead of killing it without a word."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _failure_line(e: Exception) -> tuple[str, int]:
    """The line and exit code for an exception that is not a UserError."""
    refusal = environment_error(e)  # a full, read-only or forbidden path: the user's to fix
    if refusal is not None:
        return f"error: {refusal}", USER_ERROR_EXIT_CODE
    traceback.print_exc()
    oom = isinstance(e, MemoryError) or "OutOfMemoryError" in type(e).__name__
    line = f"{'out of memory' if oom else 'internal error'}: {type(e).__name__}: {first_line(e)}"
    return line, INTERNAL_ERROR_EXIT_CODE


def run_command(body: Callable[[], int], output_dir: Callable[[], str | None] = lambda: None) -> int:
    """Run a command's ``body`` and turn how it ended into an exit code and one line.

    ``output_dir`` says where ``error.log`` goes when ``$TERMINATION_LOG_FILE`` is unset; it is asked
    only after a failure, so it can look at what the body left behind.
    """
    try:
        with _sigterm_raises():
            return body()
    except TrainingInterrupted as e:  # a checkpoint is saved: the scheduler reruns the command to resume
        line, code = f"interrupted: {e}", e.exit_code
    except (Terminated, KeyboardInterrupt) as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not print a traceback here
        name, code = (
            ("SIGTERM", SIGTERM_EXIT_CODE) if isinstance(e, Terminated) else ("SIGINT", SIGINT_EXIT_CODE)
        )
        line = (
            f"interrupted: stopped by {name} outside a training step, so nothing new was saved; rerun the "
            "same command (it resumes from the latest complete checkpoint, if any)"
        )
    except UserError as e:
        line, code = f"error: {e}", USER_ERROR_EXIT_CODE
        if logging.getLogger("tuning").isEnabledFor(logging.DEBUG):
            traceback.print_exc()
    except Exception as e:  # anything not a user mistake is ours to fix: 203, with the traceback
        line, code = _failure_line(e)
    line = clip(line)
    print(line, file=sys.stderr)
    try:
        where = output_dir()
    except Exception:  # noqa: BLE001 (the hint is best effort: we are already failing)
        where = None
    write_termination_log(line, where)
    return code


def run_program(start: Callable[[], int]) -> NoReturn:
    """A command as a process: ``start`` imports the command and runs it, inside :func:`run_command`, so
    a stop signal while torch and transformers import ends with one line and exit 143/130 too."""
    from tuning.logs import quiet_libraries

    quiet_libraries()  # before the libraries import: what they would print at import time
    code = run_command(start)
    if os.environ.get("WORLD_SIZE", "1") != "1":  # a rank under accelerate/torchrun
        exit_process(code)
    sys.exit(code)


def exit_process(code: int) -> NoReturn:
    """Exit a rank of a multi-process run without interpreter teardown.

    The run is over, its files are written and the group is left, but torch.distributed's C++ threads
    can still abort the process while Python finalizes (SIGABRT turning a finished run into a failure;
    pytorch/pytorch#179291 describes the gloo case). Flushing and ``os._exit`` keep the exit code true.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


EXCERPT_CHARS = 80


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """A short, quoted, one-line excerpt of data for an error message: data files may hold secrets, and
    error lines end up in logs and termination logs, so no message quotes more than ``limit`` characters
    of a row (``'first words...' (1234 chars)``)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"


# filesystem refusals a user fixes, and what to do about each (exit 1, not 203: nothing of ours failed)
_ENVIRONMENT_FIXES = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota exceeded)",
    errno.EROFS: "pass a folder on a writable filesystem",
    errno.EACCES: "fix the permissions or pass another path",
    errno.ENAMETOOLONG: "use a shorter path",
}


def environment_error(error: BaseException) -> UserError | None:
    """A filesystem refusal the user fixes (full, read-only, permission, name too long) as a UserError
    naming the path; None for anything else."""
    if not isinstance(error, OSError) or error.errno not in _ENVIRONMENT_FIXES:
        return None
    where = f" {error.filename}" if error.filename else ""
    return UserError(f"cannot access{where}: {error.strerror}; {_ENVIRONMENT_FIXES[error.errno]}")
