"""Online data mixing in the Trainer: the loader that draws through the bandit's sampler, and the
callback that computes each dataset's reward and updates the mixing weights every ``update_interval``
steps (``tuning/data/odm.py`` holds the bandit; docs/data_config.md, "Online data mixing").

Rewards, as fms-acceleration-odm defines them (``reward_type``):

- ``entropy`` (default), ``entropy3_varent1``, ``entropy_last_token``: the model's predictive entropy on
  each dataset's validation rows, per row the mean over the positions that predict a trained token (fms:
  every position; in SFT most are the never-trained prompt) or the last position, divided by
  log(vocabulary size) (fms divides by log(32000) whatever the model; we use the model's own size), summed
  and averaged per dataset; ``entropy3_varent1`` is 0.75 entropy + 0.25 varentropy / log(V)^2.
- ``validation_loss``: each dataset's mean loss on its validation rows (fms reads ``eval_<name>_loss``
  from per-dataset evaluations; the same number, computed here at the update).
- ``train_loss`` / ``gradnorm``: the latest logged training loss, or 1 / (grad_norm + 1e-4), becomes the
  reward of the dataset drawn last; the others keep their last value.

Higher reward: more samples from that dataset. Every rank computes the same rewards (the validation rows
are not split across ranks; logged values are already reduced), so the samplers stay identical.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuning.data import ENTROPY_REWARDS, IGNORE_INDEX, IMAGES, VALIDATION_REWARDS, OnlineMixingSampler
from tuning.errors import UserError
from tuning.train.speed import COLLATED_COLUMNS

logger = logging.getLogger(__name__)

GRADNORM_EPSILON = 1e-4  # fms's 1 / (grad_norm + 0.0001)


def online_mixing_loader(trainer: Any, sampler: OnlineMixingSampler) -> Any:
    """The training DataLoader drawing samples through the mixing sampler, prepared by accelerate (which
    gives each rank its share of every batch of the one sequence all ranks draw)."""
    args, dataset = trainer.args, trainer.train_dataset
    # what the collators read: token ids and labels, and an image-text row's images (VisionCollator)
    columns = [c for c in (*COLLATED_COLUMNS, IMAGES) if c in dataset.column_names]
    loader = DataLoader(
        dataset.select_columns(columns),
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=trainer.data_collator,
        drop_last=args.dataloader_drop_last,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
    )
    return trainer.accelerator.prepare(loader)


def check_online_mixing(args: Any, plan: Any = None) -> None:
    """Batching options that reorder or regroup samples after the sampler drew them; rewards computed on
    image rows (the forward here passes token ids only)."""
    if plan is not None and plan.config.reward_type in VALIDATION_REWARDS:
        for name, rows in plan.validation.items():
            if IMAGES in (getattr(rows, "column_names", None) or []):
                raise UserError(
                    f"online data mixing: reward_type {plan.config.reward_type} is not computed on image rows "
                    f"(dataset '{name}'); use reward_type: train_loss or gradnorm"
                )
    if getattr(args, "max_tokens_per_batch", None):
        raise UserError(
            "online data mixing draws samples one by one, and --max_tokens_per_batch regroups them; "
            "drop --max_tokens_per_batch (or use dataprocessor type: default)"
        )
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy != "random":
        raise UserError(
            f"online data mixing chooses the order of samples itself; --train_sampling_strategy {strategy} "
            "cannot apply: drop it (or use dataprocessor type: default)"
        )


def update_interval(sampler: OnlineMixingSampler, args: TrainingArguments, max_steps: int) -> int:
    """fms's default: ``eval_steps``; without one, ``logging_steps`` (a fraction < 1 is of max_steps)."""
    steps = sampler.config.update_interval or args.eval_steps or args.logging_steps
    if steps < 1:
        steps = math.ceil(steps * max_steps)
    return max(1, int(steps))


class OnlineMixingCallback(TrainerCallback):
    """Updates the mixing weights every ``update_interval`` steps: after the step's log line when it
    has one (so ``train_loss`` reads that step's loss), else at the step's end; either way before the
    step's checkpoint, which carries the state (SFTTrainer.resume_record)."""

    def __init__(self, trainer: Any, sampler: OnlineMixingSampler) -> None:
        self.trainer = trainer
        self.sampler = sampler
        self.interval = 1
        self.pending = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.interval = update_interval(self.sampler, args, state.max_steps)
        logger.info(
            "online data mixing: %d datasets, reward %s, weights updated every %d steps, a dataset drawn every "
            "%d samples",
            len(self.sampler.plan.names),
            self.sampler.config.reward_type,
            self.interval,
            self.sampler.config.sampling_interval,
        )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step % self.interval == 0:
            if control.should_log:
                self.pending = True
            else:
                self.update(state)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.pending and logs and "loss" in logs:
            self.pending = False
            self.update(state)

    def update(self, state: TrainerState) -> None:
        sampler, reward = self.sampler, self.sampler.config.reward_type
        if reward in ("train_loss", "gradnorm"):
            key = "loss" if reward == "train_loss" else "grad_norm"
            seen = [r[key] for r in state.log_history if key in r]
            if not seen:
                logger.info(
                    "online data mixing: no %s logged yet at step %d; weights kept", key, state.global_step
                )
                return
            value = seen[-1] if reward == "train_loss" else 1 / (seen[-1] + GRADNORM_EPSILON)
            rewards, counts = sampler.buffered_reward(float(value))
        else:
            rewards, counts = validation_rewards(self.trainer, sampler, reward)
        sampler.update(rewards, counts)
        logger.info(
            "online data mixing, step %d: rewards %s; sampling ratios %s",
            state.global_step,
            _named(sampler.plan.names, sampler.rewards),
            _named(sampler.plan.names, sampler.ratio),
        )


def _named(names: list[str], values: list[float]) -> str:
    return ", ".join(f"{n} {v:.4g}" for n, v in zip(names, values, strict=True))


def validation_rewards(
    trainer: Any, sampler: OnlineMixingSampler, reward: str
) -> tuple[list[float], list[int]]:
    """Summed reward and row count per dataset over its validation rows, one row per forward (no padding
    to mask, the same number on every rank)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    rewards, counts = [], []
    try:
        # no_grad rather than inference_mode: FSDP's all-gathered parameters must stay usable for training
        with torch.no_grad(), trainer.autocast_smart_context_manager():
            for name in sampler.plan.names:
                total, n = 0.0, 0
                for row in sampler.plan.validation[name]:
                    ids = torch.tensor([row["input_ids"]], device=trainer.args.device)
                    labels = torch.tensor([row["labels"]], device=trainer.args.device)
                    if reward == "validation_loss":
                        total += float(model(input_ids=ids, labels=labels).loss)
                    else:
                        total += entropy_reward(
                            model(input_ids=ids).logits, labels[:, 1:] != IGNORE_INDEX, reward
                        )
                    n += 1
                rewards.append(total)
                counts.append(n)
    finally:
        model.train(was_training)
    return rewards, counts


def entropy_reward(logits: torch.Tensor, trained: torch.Tensor, reward: str) -> float:
    """fms's entropy rewards summed over rows (logits ``[B, T, V]``, unpadded rows): the predictive entropy
    of the positions that predict a trained token (``trained``: ``[B, T-1]``; fms takes every position,
    which in SFT is mostly the never-trained prompt), or of the last position, normalised by log(V) and
    clamped to [0, 1] per row. Only the positions used go through the softmax (a full-vocabulary float32
    copy per position)."""
    assert reward in ENTROPY_REWARDS
    max_entropy = math.log(logits.shape[-1])
    if reward == "entropy_last_token":
        entropy, _ = _entropies(logits[:, -2, :])
        return float((entropy / max_entropy).clamp(0, 1).sum())
    rows, positions = trained.nonzero(as_tuple=True)
    entropy, varentropy = _entropies(logits[rows, positions, :])
    count = torch.bincount(rows, minlength=logits.shape[0]).clamp(min=1).to(entropy.dtype)

    def per_row(values: torch.Tensor, scale: float) -> torch.Tensor:
        total = torch.zeros(logits.shape[0], dtype=values.dtype, device=values.device).index_add_(
            0, rows, values
        )
        return (total / count / scale).clamp(0, 1)

    mean_entropy = float(per_row(entropy, max_entropy).sum())
    if reward == "entropy":
        return mean_entropy
    return 0.75 * mean_entropy + 0.25 * float(per_row(varentropy, max_entropy**2).sum())


def _entropies(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy, varentropy) of each distribution along the last dimension."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1)
    return entropy, (probs * log_probs**2).sum(-1) - entropy**2
