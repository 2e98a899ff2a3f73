"""Train-stage choices for speed: the collator (padding-free where exact), the token-budget loader, and
glibc's handling of the large buffers every CPU step frees and allocates again."""

from __future__ import annotations

import ctypes
import logging
import platform
from typing import Any

from torch.utils.data import DataLoader

from tuning.data import (
    PaddingCollator,
    PaddingFreeCollator,
    TokenBudgetBatchSampler,
    VisionCollator,
    pad_token_id,
    sample_lengths,
)
from tuning.errors import UserError
from tuning.model import padding_free_blocker, padding_free_decision

COLLATED_COLUMNS = ["input_ids", "labels"]

logger = logging.getLogger(__name__)


def choose_collator(
    requested_padding_free: bool, model: Any, tokenizer: Any, packed: bool = False, processor: Any = None
) -> Any:
    """Padding-free when asked for and exact for this model (:func:`tuning.model.padding_free_decision`,
    which the memory plan calls too); otherwise right padding. Image-text models (``processor``) get
    padded batches with their images processed (:class:`VisionCollator`).

    ``packed``: the rows hold several samples each with ``position_ids`` restarting per sample
    (``--packing_strategy bfd``). Only a padding-free batch keeps those samples apart, so there is no
    padded fallback: where padding-free isn't exact, packing this way isn't either.
    """
    if processor is not None and packed:
        raise UserError("--packing is not supported for image-text models; drop --packing (docs/vision.md)")
    blocker = padding_free_blocker(model)
    if padding_free_decision(requested_padding_free, blocker, packed):
        logger.info("padding-free batches: each batch is one row, position_ids restart per sample")
        return PaddingFreeCollator()
    if requested_padding_free:
        # expected for every image-text model, so not a warning there
        log = logger.info if processor is not None else logger.warning
        log("padding-free batching is off: %s; padding each batch instead", blocker)
    if processor is not None:
        return VisionCollator(processor, pad_token_id(tokenizer))
    return PaddingCollator(pad_id=pad_token_id(tokenizer))


def token_budget_loader(trainer: Any, max_tokens: int) -> Any:
    """The training DataLoader with batches formed by a token budget, prepared by accelerate.

    Under several processes accelerate hands whole batches to ranks in turn, so each rank's batches
    keep the budget.
    """
    # the data stage's datasets hold input_ids and labels; keep just what the collators read
    dataset = trainer.train_dataset.select_columns(COLLATED_COLUMNS)
    sampler = TokenBudgetBatchSampler(
        sample_lengths(dataset),
        max_tokens,
        padded=not isinstance(trainer.data_collator, PaddingFreeCollator),
        seed=trainer.args.seed,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=trainer.data_collator,
        num_workers=trainer.args.dataloader_num_workers,
        pin_memory=trainer.args.dataloader_pin_memory,
    )
    return trainer.accelerator.prepare(loader)


# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process for the next step instead of handing it back to the OS (glibc).

    Each CPU training step frees and allocates again the same large buffers (the embedding's and the
    head's gradients, optimizer temporaries). glibc serves large blocks with a fresh ``mmap`` and trims
    the heap's top back to the OS, so every step page-faults those buffers in anew: on a 32k-vocabulary
    model ~48,000 page faults and a third of each step's CPU time (benchmarks/RESULTS.md). With mmap off
    and no trimming, freed blocks are reused. Arithmetic and results are unchanged; the process keeps its
    peak heap until it exits. Returns whether it applied (glibc only; CPU training only, see the caller).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        # no trimming (the largest value mallopt takes), and no mmap for large blocks: all from the heap
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) and libc.mallopt(_M_MMAP_MAX, 0))
    except (OSError, AttributeError):
        return False
