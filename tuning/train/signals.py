"""SIGTERM/SIGINT → finish the current optimizer step, write a checkpoint, exit with 128 + signal number.

Kubernetes and Slurm send SIGTERM and wait a grace period before SIGKILL; Hugging Face's ``Trainer`` has
no handler, so the default action kills the process mid-step and everything since the last scheduled
checkpoint is lost. The handler only records the signal; the trainer acts on it at the next step
boundary (``CheckpointProtocol.on_step_end`` in ``tuning/train/checkpoints.py``, agreed by every rank),
where a checkpoint is consistent.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch

from tuning.errors import SIGINT_EXIT_CODE, SIGTERM_EXIT_CODE

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def interrupted_exit_code(signum: int) -> int:
    """The shell convention for "ended by signal N": 143 for SIGTERM, 130 for SIGINT."""
    return {signal.SIGTERM: SIGTERM_EXIT_CODE, signal.SIGINT: SIGINT_EXIT_CODE}.get(signum, 128 + int(signum))


class StopOnSignal:
    """Records the first SIGTERM/SIGINT; a second SIGINT falls through to KeyboardInterrupt (force quit)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        """Handle the stop signals for the duration of the block (main thread only: Python's rule)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self._previous.clear()

    def requested(self, device: torch.device | str = "cpu") -> int | None:
        """The signal to stop on, agreed by all ranks: each must save at the same step or they deadlock."""
        local = self.signum or 0
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.signum
        if torch.distributed.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([local], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        agreed = int(flag.item())
        return agreed or None
