"""Logging set-up shared by every command: our INFO lines on stderr, the libraries' warnings only."""

from __future__ import annotations

import logging
import os
import sys

import datasets
import transformers

logger = logging.getLogger("tuning")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time, so repeated in-process runs (tests, notebooks)
    never write to a stream that was replaced and closed since set-up."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_logging(debug: bool = False) -> None:
    """Our INFO lines on stderr (rank 0; WARNING on the other ranks, which would repeat them), the
    libraries' warnings only. Called once at the start of a command and again with ``debug`` once the
    command line has been parsed (``--log_level debug``): the level comes from the parsed flag, never
    from scanning argv."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug and int(os.environ.get("RANK", "0")) > 0:
        logger.setLevel(logging.WARNING)
    transformers.logging.set_verbosity_info() if debug else transformers.logging.set_verbosity_warning()
    datasets.logging.set_verbosity_warning()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
