"""Train stage: a thin ``transformers.Trainer`` subclass and the function that assembles it.

The training loop is Hugging Face's; we add only what it lacks, through its extension points.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import Trainer

from tuning.config.args import TrainArgs
from tuning.data import PaddingCollator, PreparedData, pad_token_id
from tuning.data.tokenize import IGNORE_INDEX
from tuning.model import PrecisionPlan
from tuning.train.callbacks import TrainingLogCallback

logger = logging.getLogger(__name__)


class SFTTrainer(Trainer):
    """Counts the tokens that carried loss, for the run summary and tokens/s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained_tokens = 0

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if model.training and "labels" in inputs:
            # the model shifts labels by one: the first position never carries loss
            self.trained_tokens += int((inputs["labels"][..., 1:] != IGNORE_INDEX).sum())
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )


def configure_precision(args: TrainArgs, plan: PrecisionPlan) -> None:
    """Turn the precision plan into the Trainer's mixed-precision switches."""
    if plan.autocast == torch.bfloat16:
        args.bf16 = True
    elif plan.autocast == torch.float16:
        args.fp16 = True


def build_trainer(
    args: TrainArgs, model: Any, tokenizer: Any, data: PreparedData, plan: PrecisionPlan
) -> SFTTrainer:
    configure_precision(args, plan)
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
    if args.gradient_checkpointing and args.gradient_checkpointing_kwargs is None:
        # non-reentrant checkpointing lets gradients reach inputs that don't require grad (adapters)
        args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    if data.validation is None and args.eval_strategy != "no":
        logger.warning("eval_strategy=%s but no --validation_data_path; not evaluating", args.eval_strategy)
        args.eval_strategy = "no"
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=PaddingCollator(pad_id=pad_token_id(tokenizer)),
        processing_class=tokenizer,
        callbacks=[TrainingLogCallback(args.output_dir)],
    )
