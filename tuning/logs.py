"""Logging set-up shared by every command: our INFO lines on stderr, the libraries' warnings only, and no
library progress bars where stderr is not a terminal."""

from __future__ import annotations

import logging
import os
import sys
import warnings

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
    import datasets
    import transformers

    quiet_libraries()
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug and int(os.environ.get("RANK", "0")) > 0:
        logger.setLevel(logging.WARNING)
    transformers.logging.set_verbosity_info() if debug else transformers.logging.set_verbosity_warning()
    datasets.logging.set_verbosity_warning()
    if not sys.stderr.isatty():
        disable_progress_bars()
    quiet_deepspeed_detection()


def quiet_libraries() -> None:
    """Before the libraries import (the commands call it first; it imports nothing): what they would
    print that is not the user's to act on."""
    # transformers' deprecation notices about its own renames (gradient_checkpointing → activation_
    # checkpointing, is_gradient_checkpointing, ...): flags that stay ours to accept, nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    # bitsandbytes, imported by peft whenever it is installed, looks up (through the kernels package) and
    # warns at import time on CPUs about a 4-bit kernel only QLoRA would use; the model stage puts both
    # levels back for a run that uses them (QLoRA; a Hub attention kernel)
    for name in ("bitsandbytes", "kernels"):
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.ERROR)
    # the Trainer aligns the config's special-token ids with the tokenizer's and says so; every saved
    # config gets the base's ids back (tuning/model/loading.py generation_use_cache), so the line is untrue
    aligned = logging.getLogger("transformers.trainer_utils")
    if not any(isinstance(f, _AlignedTokensLine) for f in aligned.filters):
        aligned.addFilter(_AlignedTokensLine())


class _AlignedTokensLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("The tokenizer has new PAD/BOS/EOS tokens")


def quiet_deepspeed_detection() -> None:
    """accelerate imports DeepSpeed whenever it is installed (every ``save_pretrained`` unwraps the model
    through it), and DeepSpeed then prints "Setting accelerator to CPU ..." on stdout when it finds no
    GPU. On such a machine CPU is what DeepSpeed would pick; naming it (its own ``DS_ACCELERATOR``) picks
    it without the line. A machine with an accelerator is left to DeepSpeed's detection."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.accelerator.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def disable_progress_bars() -> None:
    """No tqdm bars from the libraries: transformers' ("Loading weights", "Writing model shards"),
    huggingface_hub's (downloads) and datasets' (maps). In a file, a CI or Kubernetes log each bar is a
    run of carriage-return frames between our lines; our own progress prints plain lines there instead
    (tuning/train/progress.py). Called when stderr is not a terminal, and for ``--disable_tqdm``."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # turns off huggingface_hub's bars too
