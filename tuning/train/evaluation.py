"""What an evaluation shows beyond the loss: sample generations, and early stopping on its metric.

Sample generations (``--eval_generations N``): the first N validation samples that have a prompt before
their first trained token. The prompt is those tokens exactly as the run trained them: for chat data the
conversation rendered by the model's template up to the assistant turn (what the template's generation
prompt renders; the data stage checks that seam), for text data the text up to and including the
response template. The reference is that first trained span. Each is answered greedily, stopping on the
run's stop tokens or after ``--eval_max_new_tokens``. The same function answers the demo's questions.

Early stopping is Hugging Face's ``EarlyStoppingCallback`` rule; its counter is rebuilt from the
evaluations a resumed checkpoint's ``trainer_state.json`` carries (Hugging Face restores callback state
only with ``restore_callback_states_from_checkpoint``, which would also restore the Trainer's control
flags), and the stop is written to ``training_logs.jsonl`` and the run summary.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import EarlyStoppingCallback, GenerationConfig, TrainerCallback

from tuning.data import IGNORE_INDEX, pad_token_id
from tuning.train.callbacks import TrainingLogCallback, continue_training_logs
from tuning.train.records import record_path

logger = logging.getLogger(__name__)

EVAL_GENERATIONS_NAME = "eval_generations.jsonl"


@dataclass(frozen=True)
class Prompt:
    """A prompt's token ids and the trained answer that followed it."""

    ids: list[int]
    reference: list[int]


def prompts_from_samples(rows: Iterable[dict[str, Any]], n: int) -> list[Prompt]:
    """The first ``n`` samples' prompts: the tokens before the first trained token (a packed row's first
    sample only), and the trained span after it. Samples trained from their first token have no prompt."""
    prompts: list[Prompt] = []
    for row in rows:
        if len(prompts) >= n:
            break
        ids, labels = list(row["input_ids"]), list(row["labels"])
        positions = row.get("position_ids")
        if positions is not None:  # bfd packing: the first sample ends where positions restart
            end = next((i for i in range(1, len(positions)) if positions[i] == 0), len(positions))
            ids, labels = ids[:end], labels[:end]
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if not first:  # no trained token, or trained from the first token: nothing to prompt with
            continue
        end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        prompts.append(Prompt(ids[:first], ids[first:end]))
    return prompts


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    stop_ids: Sequence[int],
    max_new_tokens: int,
    *,
    synced: bool = False,
) -> list[dict[str, Any]]:
    """Greedy answers to token-id prompts, one at a time (no padding to get wrong): ``{"generation"
    (text, the stop token left out), "stopped" (ended on a stop token), "new_tokens"}``.

    ``synced``: every rank calls this with the same prompts (sharded weights: each forward is a
    collective, and a rank that stopped early keeps stepping until all have, ``synced_gpus``)."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(stop_ids) or None,
        pad_token_id=pad_token_id(tokenizer),
        use_cache=True,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([list(prompt)], device=device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=config,
                    synced_gpus=synced,
                )
                new = out[0, ids.shape[1] :].tolist()
                stopped = bool(new) and new[-1] in stop_ids
                answers.append(
                    {
                        "generation": tokenizer.decode(new[:-1] if stopped else new),
                        "stopped": stopped,
                        "new_tokens": len(new),
                    }
                )
    finally:
        model.train(was_training)
    return answers


@contextmanager
def gathered_for_generation(trainer: Any) -> Iterator[Any]:
    """The model as the engine generates with it, on every rank: DeepSpeed ZeRO-3 and FSDP2 gather each
    layer inside its forward (``synced_gpus`` keeps the ranks stepping together); the root's own
    parameters (embeddings, head, norm) are gathered here, since ``generate`` bypasses the root's forward
    hook. FSDP1 gathers the root the same way (``summon_full_params`` without recursing)."""
    model = trainer.model
    if getattr(trainer, "is_fsdp_enabled", False):
        if hasattr(model, "unshard") and hasattr(model, "reshard"):  # FSDP2's FSDPModule
            model.unshard()
            try:
                yield model
            finally:
                model.reshard()
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = trainer.model_wrapped
        context = (
            FullyShardedDataParallel.summon_full_params(wrapped, recurse=False, writeback=False)
            if isinstance(wrapped, FullyShardedDataParallel)
            else nullcontext()
        )
        with context:
            yield model
        return
    yield model


class EvalGenerations(TrainerCallback):
    """``--eval_generations``: answers for fixed validation prompts at each evaluation, into
    ``output_dir/eval_generations.jsonl`` (``step``, ``prompt``, ``reference``, ``generation``, ...),
    the trackers (as text) and, first vs last, the model card."""

    def __init__(
        self, trainer: Any, prompts: list[Prompt], stop_ids: Sequence[int], max_new_tokens: int
    ) -> None:
        self.trainer = trainer
        self.prompts = prompts
        self.stop_ids = list(stop_ids)
        self.max_new_tokens = max_new_tokens
        self.seconds: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:  # a resumed run answers its steps again: drop the later records
            continue_training_logs(Path(args.output_dir), state.global_step, EVAL_GENERATIONS_NAME)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
        if not sharded and not state.is_world_process_zero:
            return  # whole weights on every rank: rank 0 answers alone
        start = time.perf_counter()
        with gathered_for_generation(trainer) as model:
            answers = generate_answers(
                model,
                trainer.processing_class,
                [p.ids for p in self.prompts],
                self.stop_ids,
                self.max_new_tokens,
                synced=sharded and args.world_size > 1,
            )
        seconds = time.perf_counter() - start
        self.seconds.append(seconds)
        if not state.is_world_process_zero:
            return
        decode = trainer.processing_class.decode
        records = [
            {
                "step": state.global_step,
                "epoch": round(float(state.epoch or 0.0), 6),
                "prompt": decode(p.ids),
                # the trained stop token left out, as in the generation: equal text is the right answer
                "reference": decode(
                    p.reference[:-1] if p.reference[-1:] and p.reference[-1] in self.stop_ids else p.reference
                ),
                **answer,
            }
            for p, answer in zip(self.prompts, answers, strict=True)
        ]
        path = record_path(args.output_dir, EVAL_GENERATIONS_NAME)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        tokens = sum(a["new_tokens"] for a in answers)
        logger.info(
            "eval generations: %d prompts, %d tokens in %.1fs (%s)", len(records), tokens, seconds, path.name
        )
        for callback in trainer.callback_handler.callbacks:  # the trackers show them as text
            log_text = getattr(callback, "log_text", None)
            if log_text is not None:
                log_text("eval_generations", records, state.global_step)

    def report(self, output_dir: str | Path) -> dict[str, Any]:
        """The run summary's ``eval_generations`` entry: where, how many, how long each evaluation took."""
        return {
            "file": str(Path(output_dir) / EVAL_GENERATIONS_NAME),
            "prompts": len(self.prompts),
            "max_new_tokens": self.max_new_tokens,
            "evaluations": len(self.seconds),
            "seconds": [round(s, 3) for s in self.seconds],
        }


def read_eval_generations(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``eval_generations.jsonl`` (empty when there is none)."""
    path = Path(output_dir) / EVAL_GENERATIONS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class EarlyStopping(EarlyStoppingCallback):
    """Hugging Face's rule, with the counter surviving a resume and the stop recorded."""

    def __init__(self, patience: int, threshold: float, log: TrainingLogCallback) -> None:
        super().__init__(early_stopping_patience=patience, early_stopping_threshold=threshold)
        self.log = log
        self.stopped_at: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # (the parent's on_train_begin only asserts what the config's validation already refused)
        self.early_stopping_patience_counter = self.replayed_counter(args, state.log_history)

    def replayed_counter(self, args: Any, history: list[dict[str, Any]]) -> int:
        """The counter after the evaluations in ``history``, by the rule ``check_metric_value`` applies
        (compared with the best before each evaluation, which Hugging Face updates after it)."""
        key = _metric_key(args)
        better = np.greater if args.greater_is_better else np.less
        best, counter = None, 0
        for record in history:
            if key not in record:
                continue
            value = record[key]
            improved = best is None or (
                better(value, best) and abs(value - best) > self.early_stopping_threshold
            )
            counter = 0 if improved else counter + 1
            if best is None or better(value, best):
                best = value
        return counter

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float], **kwargs: Any
    ) -> None:
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if self.early_stopping_patience_counter < self.early_stopping_patience or self.stopped_at is not None:
            return  # (should_training_stop is also set at the last step)
        self.stopped_at = state.global_step
        key = _metric_key(args)
        logger.info(
            "early stopping at step %d: %s did not improve by more than %g in %d evaluations (best %s)",
            state.global_step,
            key,
            self.early_stopping_threshold,
            self.early_stopping_patience_counter,
            state.best_metric,
        )
        if state.is_world_process_zero:
            value, best = metrics.get(key), state.best_metric  # HF updates best_metric after this hook
            better = np.greater if args.greater_is_better else np.less
            best = value if best is None or better(value, best) else best
            record = {"value": value, "metric": key, "best_metric": best}
            record |= {"patience": self.early_stopping_patience, "threshold": self.early_stopping_threshold}
            self.log.append(state, [("early_stopping", record)])

    def report(self, args: Any, state: Any) -> dict[str, Any]:
        """The run summary's ``early_stopping`` entry."""
        return {
            "patience": self.early_stopping_patience,
            "threshold": self.early_stopping_threshold,
            "metric": _metric_key(args),
            "stopped_at_step": self.stopped_at,
            "evaluations_without_improvement": self.early_stopping_patience_counter,
            "best_metric": state.best_metric,
            "best_step": getattr(state, "best_global_step", None),
            "best_model_checkpoint": state.best_model_checkpoint,
        }


def _metric_key(args: Any) -> str:
    name = args.metric_for_best_model or "loss"
    return name if name.startswith("eval_") else f"eval_{name}"
