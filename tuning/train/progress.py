"""What a person watching the run reads while it trains: the start-of-run lines and progress (a bar on a
terminal, plain lines elsewhere)."""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuning.compat import transformers as hf
from tuning.config import SFTConfig
from tuning.data import PreparedData
from tuning.model import PrecisionPlan

logger = logging.getLogger("tuning")


def log_run_start(
    config: SFTConfig, model: Any, data: PreparedData, trainer: Any, plan: PrecisionPlan
) -> None:
    args = config.train
    # ZeRO-3 parameters are empty placeholders on every rank; ds_numel is the real size
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    stats = data.stats
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    logger.info(
        "model %s: %s weights, computing in %s, attention %s, %d/%d parameters trainable",
        config.model.model_name_or_path,
        str(plan.load_dtype).removeprefix("torch."),
        str(plan.autocast or plan.load_dtype).removeprefix("torch."),
        hf.attn_implementation(model.config),
        trainable,
        total,
    )
    logger.info(
        "data %s (%s): %s, %d tokens, %d trained; effective batch %d",
        config.data.training_data_path or config.data.data_config_path,
        data.data_format,
        stats.sample_counts(),
        stats.total_tokens,
        stats.trained_tokens,
        effective,
    )
    logger.info("outputs: %s (model: %s)", Path(args.output_dir).resolve(), args.save_model_dir or "none")


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class TokenRate:
    """Trained tokens per second in this process. The logged count is the run's (a resumed run starts
    from its checkpoint's count), so after a resume the rate is measured from the first count seen;
    a fresh run measures from zero at the start."""

    def __init__(self) -> None:
        self._base: tuple[float, float] | None = (0.0, time.perf_counter())

    def start(self, resumed: bool) -> None:
        self._base = None if resumed else (0.0, time.perf_counter())

    def update(self, tokens: float) -> float | None:
        """The rate up to now, given the current count (None until there are two points)."""
        now = time.perf_counter()
        if self._base is None:
            self._base = (tokens, now)
            return None
        count, since = self._base
        return (tokens - count) / (now - since) if now > since else None


class RunProgress(TrainerCallback):
    """Progress on rank 0: a bar on a terminal (steps, epoch, loss, tokens/s, ETA); on anything else (CI,
    Kubernetes logs), or with ``--disable_tqdm``, one plain line per log step and at least every
    ``every_seconds``.

    Replaces transformers' own progress callback, which prints every raw log dict under its bar and
    rewrites carriage-return frames into files that are not terminals.
    """

    def __init__(self, tty: bool | None = None, every_seconds: float = 60.0) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.every_seconds = every_seconds
        self.bar: Any = None
        self.values: dict[str, float] = {}
        self.rate = TokenRate()
        self._start = self._last_line = 0.0
        self._first_step = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        self._start = self._last_line = time.perf_counter()
        self._first_step = state.global_step
        self.rate.start(resumed=state.global_step > 0)
        logger.info(
            "training: %d steps, %g epochs, logging %s, saving %s",
            state.max_steps,
            state.num_train_epochs,
            _every(args.logging_strategy, args.logging_steps),
            _every(args.save_strategy, args.save_steps),
        )
        if state.global_step:
            logger.info("resumed from step %d of %d", state.global_step, state.max_steps)
        if self.tty and not args.disable_tqdm:  # --disable_tqdm: plain lines on a terminal too
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="training",
                unit="step",
                file=sys.stderr,
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        elif state.is_world_process_zero and time.perf_counter() - self._last_line >= self.every_seconds:
            logger.info(self.line(state))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        if not state.is_world_process_zero or not ({"loss", "eval_loss"} & logs.keys()):
            return
        self.values.update({k: float(logs[k]) for k in ("loss", "eval_loss") if k in logs})
        if "trained_tokens" in logs:
            rate = self.rate.update(float(logs["trained_tokens"]))
            if rate is not None:
                self.values["tokens_per_second"] = rate
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(state), refresh=True)
        else:
            logger.info(self.line(state))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def postfix(self, state: TrainerState) -> str:
        parts = [f"epoch {float(state.epoch or 0):.2f}"]
        if "loss" in self.values:
            parts.append(f"loss {self.values['loss']:.4f}")
        if "eval_loss" in self.values:
            parts.append(f"eval_loss {self.values['eval_loss']:.4f}")
        if "tokens_per_second" in self.values:
            parts.append(f"{self.values['tokens_per_second']:.0f} tokens/s")
        return " | ".join(parts)

    def line(self, state: TrainerState) -> str:
        self._last_line = now = time.perf_counter()
        elapsed, done = now - self._start, state.global_step - self._first_step
        eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
        pct = 100 * state.global_step / state.max_steps if state.max_steps else 0
        return (
            f"step {state.global_step}/{state.max_steps} ({pct:.0f}%) | {self.postfix(state)} | "
            f"elapsed {_clock(elapsed)} | ETA {_clock(eta) if eta is not None else '?'}"
        )


def _every(strategy: Any, steps: float) -> str:
    name = getattr(strategy, "value", strategy)
    return f"every {steps:g} steps" if name == "steps" else ("never" if name == "no" else f"every {name}")
