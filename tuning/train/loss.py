"""Cross-entropy only where a label is: the output head never sees a position that carries no loss.

With completion-only or chat masking most positions are prompt, and the output head (vocabularies of
32k–256k) dominates compute and memory. transformers computes logits for every position (or the last
``logits_to_keep``), so the full ``[tokens, vocab]`` tensor exists even when a few tokens train. Here
the model runs its decoder as usual; we take the final hidden states, keep the positions whose
shifted label is not -100, and project them through the output head in chunks. Chunks after the first
are recomputed in backward (activation checkpointing), so at most one chunk of logits is alive.
The sum is normalised by ``num_items_in_batch`` (trained tokens over the whole accumulated step and
all ranks, counted by the Trainer), so batch 1 × accumulation 8 equals batch 8 × accumulation 1.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tuning.data import IGNORE_INDEX
from tuning.model import (
    LABEL_ONLY_CHUNK_TOKENS,
    VERIFIED_ARCHITECTURES,
    LossDecision,
    causal_lm,
    decide_loss,
    label_only_blocker,
)

LossImplementation = Literal["auto", "label_only", "standard"]
logger = logging.getLogger(__name__)
DEFAULT_CHUNK_TOKENS = LABEL_ONLY_CHUNK_TOKENS
VERIFY_POSITIONS = 64  # the first-batch check of an unverified architecture: one row, this many tokens

__all__ = ["VERIFIED_ARCHITECTURES", "causal_lm"]  # re-exported: where tests and callers have found them


def resolve_loss_implementation(
    requested: LossImplementation, model: torch.nn.Module, args: Any
) -> LossDecision:
    """Which loss this run uses (:func:`tuning.model.decide_loss`, the rule the memory plan applies too);
    says which and why in one line."""
    lm = causal_lm(model)
    decision = decide_loss(
        requested,
        getattr(lm.config, "model_type", None),
        label_only_blocker(model),
        use_liger_kernel=bool(getattr(args, "use_liger_kernel", False)),
        label_smoothing_factor=float(getattr(args, "label_smoothing_factor", 0.0) or 0.0),
    )
    if requested == "label_only" and lm.config.model_type not in VERIFIED_ARCHITECTURES:
        logger.warning(
            "--loss_implementation label_only: architecture %s is not verified for it; auto would check "
            "its loss against standard on the first batch",
            lm.config.model_type,
        )
    logger.info("loss: %s (%s)", decision.loss, decision.why)
    return decision


@contextmanager
def captured_hidden_states(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the decoder's final (normed) hidden states while the full model runs.

    We run the whole model rather than its decoder alone so that DDP's and PEFT's forward wrappers
    (gradient sync, adapters, prompt tokens) still apply.
    """
    store: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        store.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = causal_lm(model).get_decoder().register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def label_only_forward(
    model: torch.nn.Module,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    correct: list[torch.Tensor] | None = None,
) -> Iterator[None]:
    """While active, ``model(**inputs)`` with ``labels`` returns outputs whose ``loss`` is the label-only
    loss (and whose logits are the last position's only); calls without labels are left alone.
    ``correct``: where each chunk appends its count of argmax predictions equal to the label.

    ``model`` is the module the Trainer calls (DDP, DeepSpeed's engine, an FSDP2 root, PEFT, or the bare
    model). Labels and ``num_items_in_batch`` are taken off its inputs before it runs, and the loss is
    computed in a forward hook placed ahead of every other, so it runs inside the model's call: under
    FSDP2 the root unit (which holds the output head) is still gathered, and the loss is one of the
    forward's outputs, so FSDP's pre-backward hook gathers the head again for backward; under DeepSpeed
    ZeRO-3 calling the head module fetches its partitions through the engine's own module hooks, in
    forward and in the chunks' recomputation. No gather of ours. The Trainer then treats the loss as
    the model's own (the same scaling across processes and accumulation).
    """
    lm = causal_lm(model)
    pending: dict[str, Any] = {}

    def before(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("labels") is None:
            return None
        kwargs = dict(kwargs)
        pending["labels"] = kwargs.pop("labels")
        pending["num_items_in_batch"] = kwargs.pop("num_items_in_batch", None)
        kwargs["logits_to_keep"] = 1
        return args, kwargs

    def after(_module: torch.nn.Module, _args: tuple, output: Any) -> Any:
        if "labels" not in pending:
            return None
        labels, num_items = pending.pop("labels"), pending.pop("num_items_in_batch")
        loss = _loss_from_hidden(lm, hidden.pop(), labels, num_items, chunk_tokens, output, correct)
        hidden.clear()
        if isinstance(output, tuple):  # return_dict=False: the loss leads, as the model's own would
            return (loss, *output)
        output["loss"] = loss
        return output

    with captured_hidden_states(model) as hidden:
        handles = [
            model.register_forward_pre_hook(before, prepend=True, with_kwargs=True),
            model.register_forward_hook(after, prepend=True),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _loss_from_hidden(
    lm: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None,
    chunk_tokens: int,
    output: Any,
    correct: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    if hidden.shape[-2] > labels.shape[-1]:  # prompt tuning prepends virtual tokens, never trained
        labels = F.pad(labels, (hidden.shape[-2] - labels.shape[-1], 0), value=IGNORE_INDEX)
    loss = chunked_cross_entropy(
        hidden,
        labels,
        lm.get_output_embeddings(),
        num_items_in_batch=num_items_in_batch,
        chunk_tokens=chunk_tokens,
        logit_transform=_logit_transform(lm.config),
        correct=correct,
    )
    aux = getattr(output, "aux_loss", None)
    if getattr(lm.config, "output_router_logits", False) and aux is not None:
        # as transformers' MoE models add it to their own loss: once per forward, unnormalised by tokens
        loss = loss + lm.router_aux_loss_coef * aux.to(loss.device)
    return loss


def label_only_loss(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    correct: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Any]:
    """Run ``model`` on ``inputs`` and return (loss, outputs) with logits only for labelled positions.

    ``outputs.logits`` holds only the last position (``logits_to_keep=1``): the head's work is ours.
    ``correct``: where each chunk appends its count of argmax predictions equal to the label.
    """
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    with label_only_forward(model, chunk_tokens, correct):
        outputs = model(**inputs, **extra)
    return outputs["loss"], outputs


def verify_label_only(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """Whether label-only equals the model's own loss on a few positions of this batch (an architecture
    outside the verified list, on its first batch). Both losses come from the same forward inputs in eval
    mode (no dropout, no random numbers drawn); every rank must call it, and all ranks take one verdict.

    Returns (agree, the numbers for the log line).
    """
    sample = _check_sample(inputs)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            standard = model(**sample)["loss"].float()
            with label_only_forward(model):
                ours = model(**sample)["loss"].float()
    finally:
        model.train(training)
    half = causal_lm(
        model
    ).get_output_embeddings().weight.dtype != torch.float32 or torch.is_autocast_enabled(standard.device.type)
    tolerance = 5e-3 if half else 1e-5  # relative; see docs/memory.md
    agree = torch.tensor(int(bool(torch.allclose(ours, standard, rtol=tolerance, atol=tolerance))))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        agree = agree.to(standard.device)
        torch.distributed.all_reduce(agree, op=torch.distributed.ReduceOp.MIN)  # one verdict for all ranks
    return bool(agree.item()), f"{ours.item():.6g} vs {standard.item():.6g}, tolerance {tolerance:g} relative"


def _check_sample(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first row's first positions, every second half of them trained: labels of our own, since the
    check compares two ways of computing one loss, not this batch's."""
    ids = inputs["input_ids"][:1, :VERIFY_POSITIONS]
    sample = {k: v[:1, : ids.shape[-1]] for k, v in inputs.items() if k in ("attention_mask", "position_ids")}
    labels = ids.clone()
    labels[:, : ids.shape[-1] // 2] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, **sample}


def chunked_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    logit_transform: Any = None,
    correct: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal-LM cross-entropy of ``head(hidden)`` against ``labels`` shifted by one, label positions only.

    Equals transformers' ``ForCausalLMLoss`` (sum over trained tokens in float32, divided by
    ``num_items_in_batch`` or, without it, by the trained tokens here).
    """
    targets = labels[..., 1:]
    keep = targets != IGNORE_INDEX
    states = hidden[..., :-1, :][keep]
    targets = targets[keep].to(states.device)
    total = states.float().sum() * 0.0  # stays in the graph: a micro-batch with no label still backprops
    n = states.shape[0]
    for start in range(0, n, chunk_tokens):
        args = (
            head,
            states[start : start + chunk_tokens],
            targets[start : start + chunk_tokens],
            logit_transform,
        )
        # one chunk needs no recomputation: its logits are the only ones alive anyway
        loss_sum, hits = (
            checkpoint(_chunk_loss, *args, use_reentrant=False) if n > chunk_tokens else _chunk_loss(*args)
        )
        total = total + loss_sum
        if correct is not None:
            correct.append(hits)
    if num_items_in_batch is None:
        return total / max(n, 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _chunk_loss(
    head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, transform: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, argmax hits) of one chunk: token accuracy from the logits the loss made."""
    logits = _project(head, states)
    if transform is not None:
        logits = transform(logits)
    hits = (logits.detach().argmax(-1) == targets).sum()
    return F.cross_entropy(logits.float(), targets, reduction="sum"), hits


def token_accuracy_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax hits, trained tokens) from full logits, for the standard loss: the positions the causal-LM
    loss scores (labels shifted by one, -100 skipped), the same ones ``chunked_cross_entropy`` counts."""
    with torch.no_grad():
        if logits.shape[-2] > labels.shape[-1]:  # prompt tuning's virtual tokens come first, never trained
            logits = logits[..., logits.shape[-2] - labels.shape[-1] :, :]
        targets = labels[..., 1:].to(logits.device)
        keep = targets != IGNORE_INDEX
        predicted = logits[..., :-1, :].argmax(-1)
        return (predicted[keep] == targets[keep]).sum(), keep.sum()


def _project(head: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    """``head(states)`` with the head's weight as the engine holds it during the model's forward.

    A plain linear head whose weight is whole here (one process, DDP, ZeRO-2, or an FSDP2 unit still
    gathered: accelerate's tail unit of final norm and head stays gathered until its backward) is applied
    directly, so no engine hook sees a second call: calling an FSDP2 unit's module again would register
    its post-backward on our chunk's input and reshard the unit before the final norm's backward needs
    it. A head whose weight is not whole here (ZeRO-3 partitions, an FSDP2 unit resharded after forward)
    or that is not a plain linear layer (adapters) is called as a module, so the engine's own hooks gather
    it, in forward and in the chunks' recomputation, as they do for the model's own call."""
    weight = getattr(head, "weight", None)
    whole = (
        type(head).forward is torch.nn.Linear.forward
        and type(weight) is torch.nn.Parameter  # not a DTensor shard
        and weight.numel() == head.in_features * head.out_features  # not a ZeRO-3 placeholder
    )
    return F.linear(states, weight, head.bias) if whole else head(states)


def _logit_transform(config: Any) -> Any:
    """What some models do to logits after the head (Granite scaling, Cohere scale, Gemma softcapping)."""
    scaling = getattr(config, "logits_scaling", None)
    scale = getattr(config, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if scaling not in (None, 1, 1.0):
        return lambda x: x / scaling
    if scale not in (None, 1, 1.0):
        return lambda x: x * scale
    if softcap:
        return lambda x: torch.tanh(x / softcap) * softcap
    return None
