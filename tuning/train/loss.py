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

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tuning.data import IGNORE_INDEX
from tuning.errors import UserError

LossImplementation = Literal["auto", "label_only", "standard"]
logger = logging.getLogger(__name__)
DEFAULT_CHUNK_TOKENS = 2048


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` module under distributed and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP and friends
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# Architectures (config.model_type) whose label-only loss tests/test_loss.py proves equal to the model's
# own, logit transforms included (Granite's scaling, Cohere's scale, Gemma's softcapping). ``auto`` picks
# label_only only for these: a new architecture may do something to its logits after the head that
# this module doesn't copy, and would then silently train on another loss. Add a type here together
# with its case in the test.
VERIFIED_ARCHITECTURES = frozenset(
    {
        "cohere",
        "cohere2",
        "gemma",
        "gemma2",
        "gemma3_text",
        "glm4",
        "gpt_neox",
        "gpt_oss",
        "granite",
        "granitemoe",
        "llama",
        "mistral",
        "mixtral",
        "olmo",
        "olmo2",
        "phi",
        "phi3",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "smollm3",
        "stablelm",
        "starcoder2",
    }
)


def resolve_loss_implementation(
    requested: LossImplementation, model: torch.nn.Module, args: Any, *, sharded: bool = False
) -> str:
    """``auto`` → ``label_only`` where it is exact, applicable and verified for the architecture, else
    ``standard``; says which it chose and why in one line.

    ``sharded``: FSDP/DeepSpeed hold the output head in shards gathered only inside the model's forward.
    """
    why_not = "the output head is sharded (FSDP/DeepSpeed)" if sharded else _why_not_label_only(model, args)
    if requested == "label_only" and why_not:
        raise UserError(f"--loss_implementation label_only cannot run: {why_not}; use auto or standard")
    model_type = getattr(causal_lm(model).config, "model_type", None)
    unverified = (
        None if model_type in VERIFIED_ARCHITECTURES else f"architecture {model_type} is not verified for it"
    )
    if requested == "label_only" and unverified:
        logger.warning("--loss_implementation label_only: %s; check its loss against standard", unverified)
    if requested != "auto":
        return requested
    chosen = "standard" if why_not or unverified else "label_only"
    logger.info(
        "loss: %s (auto%s)",
        chosen,
        f": label_only not used, {why_not or unverified}" if chosen == "standard" else "",
    )
    return chosen


def _why_not_label_only(model: torch.nn.Module, args: Any) -> str | None:
    if getattr(args, "use_liger_kernel", False):
        return "--use_liger_kernel computes the loss with its own fused kernel"
    lm = causal_lm(model)
    if not hasattr(lm, "get_decoder") or not isinstance(lm.get_output_embeddings(), torch.nn.Module):
        return f"{type(lm).__name__} has no separate decoder and output head"
    if getattr(lm.config, "is_encoder_decoder", False):
        return "the model is an encoder-decoder"
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        return f"{type(lm).__name__}.forward takes no logits_to_keep"
    if getattr(lm.config, "output_router_logits", False):  # MoE (issue 8): the aux loss lives in forward
        return "the model adds its router auxiliary loss inside its own loss (output_router_logits)"
    return None


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
    features = {k: v for k, v in inputs.items() if k != "labels"}
    with captured_hidden_states(model) as hidden:
        outputs = model(**features, logits_to_keep=1)
    labels = inputs["labels"]
    if hidden[-1].shape[-2] > labels.shape[-1]:  # prompt tuning prepends virtual tokens, never trained
        labels = F.pad(labels, (hidden[-1].shape[-2] - labels.shape[-1], 0), value=IGNORE_INDEX)
    lm = causal_lm(model)
    loss = chunked_cross_entropy(
        hidden[-1],
        labels,
        lm.get_output_embeddings(),
        num_items_in_batch=num_items_in_batch,
        chunk_tokens=chunk_tokens,
        logit_transform=_logit_transform(lm.config),
        correct=correct,
    )
    return loss, outputs


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
    logits = head(states)
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
