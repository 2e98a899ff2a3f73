"""Out-of-memory recovery (``--oom_recovery``): a micro-batch that runs out of device memory is split by
tokens and the step is redone, so the update equals the unsplit one.

Why ours: neither transformers nor accelerate recovers a step (accelerate's ``find_executable_batch_size``
restarts training with a smaller batch, which changes the run). Exactness comes from the loss being a sum
over trained tokens divided by the step's trained-token count (``num_items_in_batch``): the halves of a
micro-batch add up to its loss and gradients. A backward that failed part-way has already added some
layers' gradients, so the step's gradients are zeroed and its earlier micro-batches are run again (they are
still in memory: the Trainer fetches a step's micro-batches before running them).

With several processes the step is not redone: a rank that fails part-way through a forward or backward
has skipped collectives (DDP's gradient all-reduce, FSDP's all-gathers and reduce-scatters) that the
other ranks are already blocked in, and no collective can reach them there. So every rank takes the
same decision, stop, through the process group's key-value store instead (:class:`StopAllRanks`): the
failed rank posts its line there and exits 1 with it; a watcher thread on every other rank sees the key
and ends its process with exit 1, silently (only ending the process unblocks a rank stuck in a
collective). Limits, stated in docs/performance.md: the loss must be normalised by
``num_items_in_batch``; a redone micro-batch draws new dropout masks.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from typing import Any

import torch

from tuning.compat import torch as torch_private
from tuning.data import IGNORE_INDEX
from tuning.errors import UserError

logger = logging.getLogger("tuning")


def tokens(inputs: dict[str, Any]) -> int:
    """Real (non-padding) tokens of a collated micro-batch."""
    mask = inputs.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())


def split_by_tokens(inputs: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Two micro-batches holding the samples of ``inputs`` with about half the tokens each, or None for a
    single sample. Padded batches split by rows; padding-free rows (one row, ``position_ids`` restarting
    at 0 per sample) split at the sample boundary nearest the middle."""
    ids = inputs["input_ids"]
    if ids.shape[0] > 1:
        lengths = inputs["attention_mask"].sum(-1) if "attention_mask" in inputs else None
        cut = _middle([int(n) for n in lengths] if lengths is not None else [ids.shape[1]] * ids.shape[0])
        return [_rows(inputs, slice(0, cut)), _rows(inputs, slice(cut, None))]
    positions = inputs.get("position_ids")
    if positions is None:
        return None
    starts = (positions[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2:
        return None
    bounds = [*starts, positions.shape[1]]
    cut = bounds[_middle([b - a for a, b in zip(bounds, bounds[1:], strict=False)])]
    return [_columns(inputs, slice(0, cut)), _columns(inputs, slice(cut, None))]


def _middle(lengths: list[int]) -> int:
    """The index splitting ``lengths`` into two non-empty runs of the closest total."""
    total, running, best, best_gap = sum(lengths), 0, 1, None
    for i, n in enumerate(lengths[:-1], start=1):
        running += n
        gap = abs(total - 2 * running)
        if best_gap is None or gap < best_gap:
            best, best_gap = i, gap
    return best


def _rows(inputs: dict[str, Any], rows: slice) -> dict[str, Any]:
    return {k: v[rows] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in inputs.items()}


def _columns(inputs: dict[str, Any], columns: slice) -> dict[str, Any]:
    return {k: v[:, columns] if torch.is_tensor(v) and v.dim() > 1 else v for k, v in inputs.items()}


def free_device_memory() -> None:
    """What the failed micro-batch held (its activations are referenced from the exception's frames,
    gone once the handler has left), back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def single_sample_error(inputs: dict[str, Any], step: int, args: Any) -> UserError:
    """One line: the sample that does not fit on its own, and the flag that would help."""
    labels = inputs.get("labels")
    trained = int((labels[..., 1:] != IGNORE_INDEX).sum()) if labels is not None else 0
    n = tokens(inputs)
    fix = _least_fix(args, n, batch=1)
    return UserError(
        f"out of device memory at step {step} on a single sample of {n} tokens ({trained} trained) "
        f"even after splitting its micro-batch (--oom_recovery); pass {fix}, or use a device with more memory"
    )


def oom_recovery_enabled(args: Any) -> bool:
    """``--oom_recovery``: on by default with CUDA. One process redoes the step split; several stop
    together (see the module docstring)."""
    requested = getattr(args, "oom_recovery", None)
    return torch.cuda.is_available() if requested is None else bool(requested)


OOM_KEY = "tuning/oom_stop"
STOPPED_KEY = "tuning/oom_stopped"  # a counter: the ranks that saw the stop
# how often a rank asks the store for a peer's stop: every rank asks the one store (rank 0's TCP store),
# so a job of N ranks sends it N requests per interval
WATCH_SECONDS = 1.0
ACK_TIMEOUT_SECONDS = 30.0  # the failed rank waits this long at most for the others to stop first
OWN_EXIT_GRACE_SECONDS = 60.0  # the failed rank's own exit path, should it wait on a collective


class StopAllRanks:
    """Several processes: a rank that runs out of memory stops every rank, with one line and exit 1.

    Why a store and a thread, not a collective: the other ranks may be blocked in a collective the failed
    rank will never join (its forward or backward stopped part-way), and a thread polling the store is
    the one thing that still runs in them. ``os._exit`` because nothing else ends a thread blocked in C++.
    The failed rank exits only after the others counted themselves stopped: its exit closes its
    connections, and a peer that noticed that first would fail with a transport error instead.
    """

    def __init__(self, rank: int, world_size: int, store: Any = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.store = store if store is not None else torch_private.default_store()
        self._posted = False
        threading.Thread(target=self._watch, name="tuning-oom-watch", daemon=True).start()

    def stop(self, inputs: dict[str, Any], step: int, args: Any) -> UserError:
        """Tell the other ranks, wait until they stopped, and the line this rank exits with."""
        self._posted = True
        self.store.set(OOM_KEY, str(self.rank))
        self.store.add(STOPPED_KEY, 1)  # counted like the others: two ranks may fail at once
        deadline = time.monotonic() + ACK_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                if self.store.add(STOPPED_KEY, 0) >= self.world_size:
                    break
            except Exception:  # noqa: BLE001 (the store went with rank 0, which hosts it outside torchrun)
                break
            time.sleep(WATCH_SECONDS / 4)
        return multi_rank_error(inputs, step, self.rank, args)

    def _watch(self) -> None:
        while True:
            time.sleep(WATCH_SECONDS)
            if self._posted:  # this rank failed: its own exit path prints the line; don't cut it short
                time.sleep(OWN_EXIT_GRACE_SECONDS)
                os._exit(1)
            try:
                posted = self.store.check([OOM_KEY])
            except Exception:  # noqa: BLE001 (store gone: the job is ending anyway)
                return
            if posted and not self._posted:
                logger.debug(
                    "rank %s ran out of device memory: rank %d stops", self.store.get(OOM_KEY), self.rank
                )
                sys.stderr.flush()
                self.store.add(STOPPED_KEY, 1)
                os._exit(1)


def multi_rank_error(inputs: dict[str, Any], step: int, rank: int, args: Any) -> UserError:
    """One line: where it ran out, and the least change to the flags that lowers the peak."""
    n = tokens(inputs)
    fix = _least_fix(args, n, batch=args.per_device_train_batch_size)
    return UserError(
        f"out of device memory at step {step} on rank {rank}, in a micro-batch of {n} tokens; with several "
        f"processes --oom_recovery stops every rank (exit 1) instead of redoing the step; pass {fix}"
    )


def recover_step(trainer: Any, model: Any, inputs: dict[str, Any], num_items: Any) -> torch.Tensor:
    """After ``inputs`` ran out of memory: zero the step's gradients, run the step's earlier micro-batches
    again, then ``inputs`` in parts (halved by tokens, again while a part runs out of memory). Returns
    ``inputs``' loss (the sum of its parts'); the earlier micro-batches' losses are already counted.

    ``trainer.step_micro_batches``: this step's micro-batches (tuning/train/hf_private.py);
    ``trainer.split_micro_batches``: id(micro-batch) → the parts it runs as in this step."""
    step = trainer.state.global_step + 1
    if num_items is None or not trainer.model_accepts_loss_kwargs:
        raise UserError(
            f"out of device memory at step {step}; --oom_recovery needs the loss normalised by the step's "
            "trained tokens, which this model's loss is not; lower --per_device_train_batch_size"
        )
    batches = trainer.step_micro_batches
    at = next((i for i, b in enumerate(batches) if b is inputs), None)
    if at is None:  # tests/test_hf_private.py pins that training_step gets the step's own objects
        raise RuntimeError("--oom_recovery: the failed micro-batch is not among the step's micro-batches")
    originals = [*batches[:at], inputs]
    parts = trainer.split_micro_batches
    failed: dict[str, Any] | None = inputs
    while failed is not None:
        owner = next((k for k, ps in parts.items() if any(p is failed for p in ps)), id(failed))
        current = parts.get(owner, [failed])
        halves = split_by_tokens(failed)
        if halves is None:
            raise single_sample_error(failed, step, trainer.args)
        index = next(i for i, p in enumerate(current) if p is failed)
        parts[owner] = [*current[:index], *halves, *current[index + 1 :]]
        if step not in trainer.oom_logged_steps:  # one line per step
            trainer.oom_logged_steps.add(step)
            logger.warning(
                "out of device memory in step %d: redoing the step with a micro-batch of %d tokens run as "
                "%s (--oom_recovery; the update equals the unsplit one)",
                step,
                tokens(failed),
                " + ".join(str(tokens(p)) for p in halves),
            )
        failed, loss = _run_again(trainer, model, originals, parts, num_items)
    return loss


def _run_again(
    trainer: Any, model: Any, originals: list[dict[str, Any]], parts: dict[int, list], num_items: Any
) -> tuple[dict[str, Any] | None, torch.Tensor]:
    """The step's micro-batches up to the failed one, from zero gradients; (the part that ran out of
    memory or None, the last micro-batch's loss)."""
    model.zero_grad(set_to_none=True)
    trainer.restart_step_counts()
    free_device_memory()
    loss = torch.zeros(())
    for batch in originals:
        loss = torch.zeros(())
        for part in parts.get(id(batch), [batch]):
            try:
                loss = loss.to(trainer.args.device) + trainer.plain_training_step(model, part, num_items)
            except torch.OutOfMemoryError:
                failed = part
            else:
                continue
            return failed, loss  # outside the handler: its frames (the part's tensors) are released
    return None, loss


def _least_fix(args: Any, n: int, batch: int) -> str:
    """The first flag down the ladder that lowers the peak of a micro-batch of ``batch`` samples and
    ``n`` tokens: checkpointing, a smaller batch, offloading, then shorter samples."""
    if not args.gradient_checkpointing:
        return "--gradient_checkpointing True"
    if batch > 1:
        return f"--per_device_train_batch_size {batch // 2} with twice the --gradient_accumulation_steps"
    if not getattr(args, "activation_offloading", False):
        return "--activation_offloading true"
    return f"--max_seq_length {max(n // 2, 1)} (truncates longer samples)"
