"""Online data mixing (ODM): a data config with ``dataprocessor: type: odm`` (fms-hf-tuning 3.x).

Each dataset is an arm of a multi-armed bandit (EXP3, as in "Online Data Mixing", Albalak et al. 2023,
and fms-acceleration-odm's ``OnlineMixingDataset``). Every ``sampling_interval`` samples an arm is drawn
by the current sampling ratios and the next sample of that dataset is taken; every ``update_interval``
optimizer steps each arm gets a reward (``reward_type``) and its weight moves::

    ratio_k  = (1 - gamma) * w_k / sum(w) + gamma / K
    w_k     *= exp(eta * (reward_k / count_k) / ratio_k / K)

Written here rather than used from fms-acceleration-odm: that package pins torch 2.8 and
transformers <= 4.55 (and patches the Trainer's private evaluate/dataloader methods), so it cannot run on
this stack. This module is the bandit and the sampler with its exact state; the rewards that need the
model and the Trainer glue are ``tuning/train/mixing.py``.

Differences from fms, on purpose: the sampler is a map-style sampler over the datasets concatenated, so a
pass ("epoch") draws as many samples as the datasets hold together (fms's iterable needs ``max_steps``);
each dataset's rows are reshuffled (seeded) each time it is gone through (fms reads them in file order).
"""

from __future__ import annotations

import base64
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from tuning.errors import UserError

# fms-acceleration-odm's Reward enum (lower-case, as its docs and configs write them)
ENTROPY_REWARDS = ("entropy", "entropy3_varent1", "entropy_last_token")
REWARD_TYPES = (*ENTROPY_REWARDS, "train_loss", "validation_loss", "gradnorm")
# rewards computed on each dataset's validation rows (split: validation > 0)
VALIDATION_REWARDS = (*ENTROPY_REWARDS, "validation_loss")
# fms's buffer start value for an arm whose reward was never seen
UNSEEN_REWARD = 1e-100


@dataclass
class OdmConfig:
    """The ``dataprocessor.odm`` mapping: fms-hf-tuning's ``ODM`` dataclass, same keys and defaults."""

    update_interval: int | None = None  # None: --eval_steps, else --logging_steps (fms: eval_steps)
    sampling_interval: int = 1
    reward_type: str = "entropy"
    gamma: float = 0.1
    eta: float = 0.3
    resume_from_checkpoint: bool | str = False  # fms fills it from the CLI; our resume is the CLI's
    auto_categorize_input_column: str | None = None
    auto_categorize_num_categories: int | None = None
    auto_categorize_model_name: str = "Qwen/Qwen3-Embedding-0.6B"
    auto_categorize_batch_size: int = 64


def check_odm(odm: OdmConfig, datasets: Sequence[Any], where: str) -> None:
    """Values an ODM config cannot run with, refused in one line each (``datasets``: DatasetConfig)."""
    odm.reward_type = odm.reward_type.lower()  # fms upper-cases it into its enum
    if odm.reward_type not in REWARD_TYPES:
        raise UserError(
            f"{where}: reward_type '{odm.reward_type}' is unknown; use one of {', '.join(REWARD_TYPES)}"
        )
    if odm.update_interval is not None and odm.update_interval < 1:
        raise UserError(
            f"{where}: update_interval {odm.update_interval} must be a whole number of steps >= 1"
        )
    if odm.sampling_interval < 1:
        raise UserError(
            f"{where}: sampling_interval {odm.sampling_interval} must be a whole number of samples >= 1"
        )
    if not (math.isfinite(odm.gamma) and 0 <= odm.gamma <= 1):
        raise UserError(
            f"{where}: gamma {odm.gamma} is out of range; use a number in [0, 1] (fms default 0.1)"
        )
    if not (math.isfinite(odm.eta) and odm.eta > 0):
        raise UserError(f"{where}: eta {odm.eta} must be a positive number (fms default 0.3)")
    if odm.auto_categorize_input_column is not None:
        # fms embeds the rows with a sentence-embedding model from the Hub and clusters them
        raise UserError(
            f"{where}: auto_categorize_input_column is not supported (it needs an embedding model from the Hub); "
            "list each category as its own dataset under 'datasets'"
        )
    if len(datasets) < 2:
        raise UserError(
            f"{where}: online data mixing needs at least two datasets to mix; add another dataset"
        )
    if odm.reward_type in VALIDATION_REWARDS:
        for d in datasets:
            if not (d.split or {}).get("validation"):
                raise UserError(
                    f"{where}: reward_type {odm.reward_type} is computed on each dataset's validation rows, and "
                    f"dataset '{d.name}' has none; give it split: {{train: 0.9, validation: 0.1}} or use "
                    "reward_type: train_loss"
                )


def sampling_ratio(weights: Sequence[float], gamma: float) -> list[float]:
    """EXP3's mixing of the weights with uniform exploration: the probability of drawing each arm."""
    total, k = sum(weights), len(weights)
    return [(1.0 - gamma) * w / total + gamma / k for w in weights]


def updated_weights(
    weights: Sequence[float],
    ratio: Sequence[float],
    rewards: Sequence[float],
    counts: Sequence[float],
    eta: float,
) -> list[float]:
    """EXP3's update: each arm's mean reward, importance-weighted by the probability it had."""
    k = len(weights)
    return [
        w * math.exp(eta * (r / c) / p / k)
        for w, p, r, c in zip(weights, ratio, rewards, counts, strict=True)
    ]


@dataclass
class MixingPlan:
    """What the data stage hands the train stage: the datasets concatenated in ``names`` order (sorted,
    as fms numbers its arms), where each starts, and each one's validation rows (for the rewards)."""

    config: OdmConfig
    names: list[str]
    offsets: list[int]
    lengths: list[int]
    initial_weights: list[float]
    seed: int
    validation: dict[str, Any] = field(default_factory=dict)


class OnlineMixingSampler(Sampler[int]):
    """Indices into the concatenated datasets, drawn arm by arm; ``update`` moves the weights.

    Resume is exact: :meth:`state_dict` holds the bandit, the random state and the arms drawn so far in
    this pass. The Trainer's resume re-iterates the pass and skips the batches it trained; the sampler
    replays the saved arms first (those, and any it had fetched ahead), then draws on from the saved
    random state, so the resumed run sees the uninterrupted run's samples and weights.
    """

    def __init__(self, plan: MixingPlan) -> None:
        self.plan = plan
        self.config = plan.config
        k = len(plan.names)
        self.weights = [float(w) for w in plan.initial_weights]
        self.ratio = sampling_ratio(self.weights, self.config.gamma)
        self.rng = random.Random(plan.seed)
        self.arm = 0
        self.produced = 0
        self.counts = [0] * k  # samples drawn per arm, over the run
        self.rewards = [0.0] * k  # the last update's rewards
        self.reward_buffer = [UNSEEN_REWARD] * k  # train_loss / gradnorm: the last value seen per arm
        self.updates = 0
        self.cursors = [0] * k  # next position in each dataset's current pass through it
        self.cycles = [0] * k  # how many times each dataset has been gone through
        self.pass_start: tuple[list[int], list[int]] = ([0] * k, [0] * k)
        self.pass_arms = bytearray()  # the arm of every sample drawn in this pass
        self._replay: bytes | None = None
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return sum(self.plan.lengths)

    def _order(self, arm: int) -> np.ndarray:
        cycle = self.cycles[arm]
        cached = self._orders.get(arm)
        if cached is None or cached[0] != cycle:
            rng = np.random.default_rng([self.plan.seed, arm, cycle])
            cached = (cycle, rng.permutation(self.plan.lengths[arm]))
            self._orders[arm] = cached
        return cached[1]

    def _take(self, arm: int) -> int:
        index = self.plan.offsets[arm] + int(self._order(arm)[self.cursors[arm]])
        self.cursors[arm] += 1
        if self.cursors[arm] == self.plan.lengths[arm]:  # gone through: next pass in a new order
            self.cursors[arm], self.cycles[arm] = 0, self.cycles[arm] + 1
        return index

    def __iter__(self) -> Iterator[int]:
        replay, self._replay = self._replay, None
        if replay is not None:
            self.cursors, self.cycles = list(self.pass_start[0]), list(self.pass_start[1])
            for arm in replay:
                yield self._take(arm)
        else:
            self.pass_start = (list(self.cursors), list(self.cycles))
            self.pass_arms = bytearray()
        for _ in range(len(self) - len(self.pass_arms)):
            if self.produced % self.config.sampling_interval == 0:
                self.arm = self.rng.choices(range(len(self.weights)), weights=self.ratio, k=1)[0]
            self.counts[self.arm] += 1
            self.produced += 1
            self.pass_arms.append(self.arm)
            yield self._take(self.arm)

    def update(self, rewards: Sequence[float], counts: Sequence[float]) -> None:
        """One bandit step with each arm's summed reward over ``counts`` evaluations."""
        self.weights = updated_weights(self.weights, self.ratio, rewards, counts, self.config.eta)
        self.ratio = sampling_ratio(self.weights, self.config.gamma)
        self.rewards = [r / c for r, c in zip(rewards, counts, strict=True)]
        self.updates += 1

    def buffered_reward(self, value: float) -> tuple[list[float], list[int]]:
        """fms's train_loss / gradnorm rewards: ``value`` becomes the reward of the arm drawn last; the
        other arms keep the last value they had (the start value if never drawn at an update)."""
        self.reward_buffer[self.arm] = value
        return list(self.reward_buffer), [1] * len(self.reward_buffer)

    def log_fields(self) -> dict[str, float]:
        """The mixing state for the log line: each dataset's sampling ratio, last reward, samples drawn."""
        fields = {f"odm_ratio/{n}": p for n, p in zip(self.plan.names, self.ratio, strict=True)}
        fields.update({f"odm_reward/{n}": r for n, r in zip(self.plan.names, self.rewards, strict=True)})
        fields.update({f"odm_drawn/{n}": c for n, c in zip(self.plan.names, self.counts, strict=True)})
        return fields

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (it goes into the checkpoint's marker)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "names": self.plan.names,
            "weights": self.weights,
            "ratio": self.ratio,
            "rng": [version, list(internal), gauss],
            "arm": self.arm,
            "produced": self.produced,
            "counts": self.counts,
            "rewards": self.rewards,
            "reward_buffer": self.reward_buffer,
            "updates": self.updates,
            "cursors": self.cursors,
            "cycles": self.cycles,
            "pass_start": [list(self.pass_start[0]), list(self.pass_start[1])],
            "pass_arms": base64.b64encode(bytes(self.pass_arms)).decode("ascii"),
        }

    def load_state_dict(self, state: dict[str, Any], mid_pass: bool = True) -> None:
        """``mid_pass``: the checkpoint is inside an epoch, so the Trainer will go through this pass again
        and skip what it trained (the arms are replayed, even when the loader had already fetched to the
        pass's end); at an epoch's end the next iteration is a new pass, as in the uninterrupted run."""
        if list(state["names"]) != self.plan.names:
            raise UserError(
                f"the checkpoint's online data mixing has datasets {state['names']}, this run {self.plan.names}; "
                "resume with the same data config, or start over with --resume_from_checkpoint false"
            )
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        for key in ("weights", "ratio", "counts", "rewards", "reward_buffer", "cursors", "cycles"):
            setattr(self, key, list(state[key]))
        self.arm, self.produced, self.updates = state["arm"], state["produced"], state["updates"]
        self.pass_start = (list(state["pass_start"][0]), list(state["pass_start"][1]))
        self.pass_arms = bytearray(base64.b64decode(state["pass_arms"]))
        self._replay = bytes(self.pass_arms) if mid_pass else None
