"""Train-stage choices for speed: the collator (padding-free where exact) and the token-budget loader."""

from __future__ import annotations

import inspect
import logging
from typing import Any

from torch.utils.data import DataLoader

from tuning.data import (
    PaddingCollator,
    PaddingFreeCollator,
    TokenBudgetBatchSampler,
    pad_token_id,
    sample_lengths,
)
from tuning.errors import UserError

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
    return None


def choose_collator(requested_padding_free: bool, model: Any, tokenizer: Any, packed: bool = False) -> Any:
    """Padding-free when asked for and exact for this model; otherwise right padding.

    ``packed``: the rows hold several samples each with ``position_ids`` restarting per sample
    (``--packing_strategy bfd``). Only a padding-free batch keeps those samples apart, so there is no
    padded fallback: where padding-free isn't exact, packing this way isn't either.
    """
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
    dataset = trainer._remove_unused_columns(trainer.train_dataset, description="Training")
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
