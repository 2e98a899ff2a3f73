"""One writer per ``output_dir``: an OS lock that dies with its process.

Two runs on one output_dir destroy each other: the second one's start-up deletes the checkpoint the
first is still writing (to it, a leftover of a killed save). The motivating case is a replacement pod
that starts while the old one still saves its checkpoint after SIGTERM. So the process that writes
``output_dir`` (the one with ``should_save``: global rank 0, or each node's local rank 0 with
``--save_on_each_node``) holds ``fcntl.flock`` on ``output_dir/.tuning.lock`` for the whole run. The
kernel releases the lock when the process ends, however it ends (kill -9, OOM, node loss of a local
filesystem): no stale lock to clean up by hand, nothing to time out. A second run waits a bounded time
for the holder to finish (``--wait_for_output_dir``, default 300 s: longer than a grace period's
save), then exits 1 naming the holder (pid, host, since when).

- The lock file is deleted only by its holder, while holding it, and only when the run created it and
  leaves the folder as it found it (a run that failed before training, ``tuning/train/run_folder.py``).
  A waiter that then wins the lock on the deleted file sees that the path no longer names the file it
  locked (another inode, or none) and locks the path afresh, so two runs never hold different files.
- NFS (v3 with lockd, v4) implements ``flock`` as a whole-file POSIX lock seen by every client, so one
  job per output_dir holds across machines. Filesystems without locks (Lustre mounted without
  ``-o flock``, some FUSE mounts) refuse it: the run then goes on with a warning, unprotected.
- A child forked without ``exec`` (a DataLoader worker) shares the lock until it exits; those workers
  end within seconds of their parent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from tuning.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".tuning.lock"
DEFAULT_WAIT_SECONDS = 300.0
_REPORT_EVERY_SECONDS = 30.0
# the filesystem has no locks (or refuses them); anything else is a real failure
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def holder_of(output_dir: str | Path) -> str:
    """Who holds the lock on ``output_dir``, as written by the holder: ``pid 12 on host-a since ...``."""
    try:
        info = json.loads((Path(output_dir) / LOCK_NAME).read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # being rewritten right now, or not ours
        return "an unknown process"


class OutputDirLock:
    """The lock on ``output_dir``, held from :meth:`acquire` to :meth:`release`. Records whether this
    process created the folder and the lock file, so a run that leaves nothing behind can remove them."""

    def __init__(
        self, output_dir: str | Path, wait_seconds: float = DEFAULT_WAIT_SECONDS, poll_seconds: float = 0.5
    ):
        self.folder = Path(output_dir)
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds
        self.created_folder = False
        self.created_file = False
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, waiting up to ``wait_seconds`` for another holder; raises :class:`UserError`
        when it is still held after the wait, or the folder or its lock file can't be created."""
        deadline = time.monotonic() + self.wait_seconds
        while True:
            fd = self._open()
            try:
                locked = _acquire(fd, self.folder, max(deadline - time.monotonic(), 0), self.poll_seconds)
            except BaseException:
                os.close(fd)
                raise
            if not locked or _same_file(fd, self.folder / LOCK_NAME):
                break
            os.close(fd)  # its holder deleted the file as it left: lock what the path names now
        self._fd = fd
        if locked:
            _write_holder(fd)

    def _open(self) -> int:
        path = self.folder / LOCK_NAME
        try:
            try:
                self.folder.mkdir(parents=True)
                self.created_folder = True
            except FileExistsError:
                pass
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self.created_file = True
            except FileExistsError:
                fd = os.open(path, os.O_RDWR)
                self.created_file = False
            return fd
        except FileNotFoundError:  # the file (or the folder) was removed between the two opens: again
            return self._open()
        except OSError as e:
            raise UserError(
                f"--output_dir {self.folder}: cannot create it or its lock file ({e.strerror or e}); "
                "pass a folder this user can write"
            ) from None

    def release(self, *, remove: bool = False) -> None:
        """Let go of the lock. ``remove``: also delete the lock file if this process created it, and the
        folder if this process created it and it is empty now (the folder as it was found)."""
        if self._fd is None:
            return
        try:
            if remove and self.created_file:
                (self.folder / LOCK_NAME).unlink(missing_ok=True)  # while held: see the module docstring
                if self.created_folder:
                    with contextlib.suppress(OSError):  # not empty: something else lives there now
                        self.folder.rmdir()
        finally:
            os.close(self._fd)  # releases the lock
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        held, named = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


@contextlib.contextmanager
def output_dir_lock(
    output_dir: str | Path,
    wait_seconds: float = DEFAULT_WAIT_SECONDS,
    *,
    enabled: bool = True,
    poll_seconds: float = 0.5,
) -> Iterator[None]:
    """Hold the output_dir lock for the block; wait up to ``wait_seconds`` for another holder to end.

    ``enabled`` False (a rank that writes nothing) makes it a no-op. Raises :class:`UserError` when the
    lock is still held after the wait.
    """
    if not enabled:
        yield
        return
    lock = OutputDirLock(output_dir, wait_seconds, poll_seconds)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()  # the file stays (see the module docstring)


def _acquire(fd: int, folder: Path, wait_seconds: float, poll_seconds: float) -> bool:
    """Take the lock, waiting for another holder up to ``wait_seconds``. False: no locks here."""
    start = time.monotonic()
    reported = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            logger.warning(
                "cannot lock %s (%s): this filesystem has no file locks, so a second run on the same "
                "--output_dir would not be noticed; make sure only one runs",
                folder,
                e.strerror or e,
            )
            return False
        else:
            if reported is not None:
                logger.info("%s is free now (waited %.0f s)", folder, time.monotonic() - start)
            return True
        waited = time.monotonic() - start
        holder = holder_of(folder)
        if waited >= wait_seconds:
            raise UserError(
                f"--output_dir {folder} is in use by another run ({holder}); waited {waited:.0f} s. "
                "Stop that run or wait for it to end, or pass another --output_dir "
                "(--wait_for_output_dir SECONDS waits longer)"
            )
        if reported is None or waited - reported >= _REPORT_EVERY_SECONDS:
            reported = waited
            logger.warning(
                "--output_dir %s is in use by another run (%s); waiting up to %.0f s for it to end "
                "(--wait_for_output_dir)",
                folder,
                holder,
                wait_seconds,
            )
        time.sleep(min(poll_seconds, max(wait_seconds - waited, 0.01)))


def _write_holder(fd: int) -> None:
    """Say who holds the lock, for the message a waiting run prints (rewritten in place: same inode)."""
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)
