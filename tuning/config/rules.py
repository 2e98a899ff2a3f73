"""What each value may be, beyond its type: numeric ranges, and text that may not be empty.

One table for every numeric field of every argument group (a test fails when a group, or a new
transformers release, adds a numeric field without a rule here). The parser checks the parsed values
before any dataclass is built, naming where each value came from; the dataclasses check themselves with
the same rules when built directly. Rules about combinations of flags live in ``parser.validate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tuning.errors import UserError

# numpy's seeding (which transformers.set_seed calls) takes 0 <= seed < 2**32; torch's takes more
SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class Bounds:
    """``low <= value <= high`` (either end open with ``low_open``/``high_open``, absent with None).
    Floats must also be finite. ``example`` is a sensible value for the fix in the message."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    example: str = ""

    def allows(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, is_float: bool) -> str:
        kind = "a finite number" if is_float else "a whole number"
        low = None if self.low is None else _num(self.low)
        high = None if self.high is None else _num(self.high)
        if low is not None and high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        if high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {high}"
        return kind


def _num(x: float) -> str:
    """1.0 → "1", 5e-05 → "5e-05", nan → "nan": as short as the value allows, never rounded."""
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


POSITIVE = Bounds(1, example="1")  # counts: batch sizes, steps, shards, ranks
NON_NEGATIVE = Bounds(0, example="0")
FRACTION = Bounds(0, 1, high_open=True, example="0.1")  # [0, 1): dropouts, betas, smoothing, ratios
SEED = Bounds(0, SEED_MAX, example="42")

# Every int/float field (also inside Optional/list) of every argument group, by flag name.
BOUNDS: dict[str, Bounds] = {
    # data
    "num_train_dataset_shards": POSITIVE,
    "num_eval_dataset_shards": POSITIVE,
    "max_seq_length": Bounds(1, example="4096"),
    "chat_render_budget": Bounds(1, example="4000000"),
    "max_dropped_fraction": Bounds(0, 1, example="0.1"),
    "max_truncated_fraction": Bounds(0, 1, example="0.1"),
    "min_trained_tokens_fraction": Bounds(0, 1, example="0.02"),
    "max_duplicate_fraction": Bounds(0, 1, example="0.1"),
    "max_empty_trained_fraction": Bounds(0, 1, example="0.05"),
    "audit_samples": Bounds(0, example="3"),
    # schedule and optimizer
    "per_device_train_batch_size": Bounds(1, example="8"),
    "per_device_eval_batch_size": Bounds(1, example="8"),
    "gradient_accumulation_steps": Bounds(1, example="4"),
    "num_train_epochs": Bounds(0, example="3"),  # 0 with no --max_steps: refused in parser.validate
    "max_steps": Bounds(-1, example="1000 (or -1: train by epochs)"),
    "learning_rate": Bounds(0, example="2e-05"),
    "warmup_steps": Bounds(0, example="100 (a value below 1 is a fraction of the steps)"),
    "warmup_ratio": Bounds(0, 1, high_open=True, example="0.03"),
    "weight_decay": Bounds(0, example="0.01"),
    "adam_beta1": Bounds(0, 1, high_open=True, example="0.9"),
    "adam_beta2": Bounds(0, 1, high_open=True, example="0.999"),
    "adam_epsilon": Bounds(0, example="1e-08"),  # torch's AdamW refuses a negative eps
    "max_grad_norm": Bounds(0, example="1.0 (0 turns clipping off)"),
    "label_smoothing_factor": FRACTION,
    "neftune_noise_alpha": Bounds(0, example="5"),
    "torch_empty_cache_steps": POSITIVE,
    "eval_accumulation_steps": POSITIVE,
    # logging, evaluation, saving (a step count of 0 is refused when its strategy is steps: validate)
    "logging_steps": Bounds(0, example="10"),
    "eval_steps": Bounds(0, example="100"),
    "save_steps": Bounds(0, example="500"),
    "eval_delay": NON_NEGATIVE,
    "save_total_limit": Bounds(1, example="2 (or leave it unset to keep every checkpoint)"),
    # reproducibility and processes
    "seed": SEED,
    "data_seed": SEED,
    "dataloader_num_workers": NON_NEGATIVE,
    "dataloader_prefetch_factor": POSITIVE,
    "ddp_bucket_cap_mb": Bounds(1, example="25"),
    "ddp_timeout": Bounds(1, example="1800"),
    "local_rank": Bounds(-1, example="-1 (set by the launcher)"),
    "max_tokens_per_batch": Bounds(1, example="16384"),  # and >= max_seq_length: validate
    "wait_for_output_dir": Bounds(0, example="300 (seconds; 0 exits at once)"),
    "eval_generations": Bounds(0, example="4"),
    "eval_max_new_tokens": Bounds(1, example="128"),
    "early_stopping_patience": Bounds(1, example="3"),
    "early_stopping_threshold": Bounds(0, example="0.01"),
    # adapters
    "lora_r": Bounds(1, example="8"),
    "lora_alpha": Bounds(1, example="16"),
    "lora_dropout": Bounds(0, 1, high_open=True, example="0.05"),
    "layers_to_transform": Bounds(0, example="0"),  # each index
    "num_virtual_tokens": Bounds(1, example="8"),
    "embedding_size_multiple_of": Bounds(1, example="64"),
    # trackers
    "aim_remote_server_port": Bounds(1, 65535, example="53800"),
}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_values(
    values: Mapping[str, Any],
    non_empty: Iterable[str],
    where: Callable[[str], str] = lambda name: "",
    floats: Iterable[str] = (),
) -> None:
    """Refuse the first value out of its range, and empty text or lists among ``non_empty`` (text flags
    where an empty value means nothing: an empty --response_template would match everywhere).

    ``where(name)`` says where a value came from (" (command line)"); None values are unset flags.
    ``floats``: the float-typed fields (an int given to one is still described as a number).
    """
    floats = set(floats)
    for name, bounds in BOUNDS.items():
        value = values.get(name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if is_number(item) and not bounds.allows(item):
                fix = f", e.g. {bounds.example}" if bounds.example else ""
                raise UserError(
                    f"--{name} is {_num(item)}{where(name)}: it must be {bounds.describe(name in floats or isinstance(item, float))}{fix}"
                )
    for name in non_empty:
        value = values.get(name)
        if value == "" or value == [] or (isinstance(value, list) and "" in value):
            what = "an empty list" if value == [] else "empty" if value == "" else "a list with an empty item"
            raise UserError(
                f"--{name} is {what}{where(name)}: give a value, or leave the flag out for its default"
            )
