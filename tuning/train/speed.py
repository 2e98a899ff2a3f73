"""Train-stage choices for speed: the collator (padding-free where exact), the token-budget loader, and
glibc's handling of the large buffers every CPU step frees and allocates again."""

from __future__ import annotations

import ctypes
import inspect
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

COLLATED_COLUMNS = ["input_ids", "labels"]

logger = logging.getLogger(__name__)


def padding_free_blocker(model: Any) -> str | None:
    """Why one padding-free row would not equal a padded batch for this model (None: it would)."""
    config = getattr(model, "peft_config", None)
    if config and any(getattr(c, "is_prompt_learning", False) for c in config.values()):
        return "prompt tuning prepends its virtual tokens once per row, not once per sample"
    if getattr(model.config, "use_cache", False):
        # with a cache object transformers skips the per-sample mask and samples attend to each other
        return "model.config.use_cache is true"
    base = getattr(model, "get_base_model", lambda: model)()
    if not type(base).__module__.startswith("transformers."):
        # remote code may build its own mask and ignore restarting position_ids
        return f"{type(base).__name__} is not a transformers model class (remote code)"
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no position_ids"
    attention = str(getattr(base.config, "_attn_implementation", "") or "")
    if "flash" not in attention and not _mask_reads_position_ids(getattr(base, "model", base)):
        # flash kernels split samples at restarting position_ids themselves; eager/sdpa/flex need a
        # mask built from them, and e.g. GptOssModel (transformers 5.24) builds its mask without them:
        # packed samples would attend to each other (measured: a second sample's logits off by 7.7)
        return f"{type(getattr(base, 'model', base)).__name__} builds its {attention} attention mask without position_ids"
    return None


_MASK_BUILDERS = ("create_causal_mask(", "create_sliding_window_causal_mask(", "mask_kwargs = {")


def _mask_reads_position_ids(decoder: Any) -> bool:
    """Whether ``decoder.forward`` hands ``position_ids`` to transformers' mask builders (which turn
    restarting positions into a per-sample mask). Read from the source: a forward that builds no mask
    through them is taken at its word (True)."""
    try:
        source = inspect.getsource(type(decoder).forward)
    except (OSError, TypeError):
        return True
    calls = []
    for opening in _MASK_BUILDERS:
        start = source.find(opening)
        while start != -1:
            calls.append(_bracketed(source, start + len(opening) - 1))
            start = source.find(opening, start + 1)
    return not calls or any("position_ids" in call for call in calls)


def _bracketed(source: str, open_at: int) -> str:
    """The text from the bracket at ``open_at`` to its match."""
    depth = 0
    for i in range(open_at, len(source)):
        if source[i] in "({[":
            depth += 1
        elif source[i] in ")}]":
            depth -= 1
            if depth == 0:
                return source[open_at : i + 1]
    return source[open_at:]


def choose_collator(
    requested_padding_free: bool, model: Any, tokenizer: Any, packed: bool = False, processor: Any = None
) -> Any:
    """Padding-free when asked for and exact for this model; otherwise right padding. Image-text models
    (``processor``) always get padded batches with their images processed (:class:`VisionCollator`).

    ``packed``: the rows hold several samples each with ``position_ids`` restarting per sample
    (``--packing_strategy bfd``). Only a padding-free batch keeps those samples apart, so there is no
    padded fallback: where padding-free isn't exact, packing this way isn't either.
    """
    if processor is not None:
        if packed:
            raise UserError(
                "--packing is not supported for image-text models; drop --packing (docs/vision.md)"
            )
        if requested_padding_free:
            logger.info(
                "padding-free batching is off for image-text models: image features and position ids "
                "(Qwen2.5-VL's 3-D rope, Mllama's cross-attention) are built per padded row; padding each batch"
            )
        return VisionCollator(processor, pad_token_id(tokenizer))
    if packed:
        blocker = padding_free_blocker(model)
        if blocker is not None:
            raise UserError(
                f"--packing_strategy bfd keeps packed samples apart through padding-free batches, which "
                f"are not exact here: {blocker}; drop --packing, or pass --packing_strategy wrapped "
                "(samples in a row then attend to each other)"
            )
        return PaddingFreeCollator()
    if requested_padding_free:
        blocker = padding_free_blocker(model)
        if blocker is None:
            return PaddingFreeCollator()
        logger.warning("padding-free batching is off: %s; padding each batch instead", blocker)
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
