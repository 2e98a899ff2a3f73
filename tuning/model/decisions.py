"""Decisions the memory plan and the run both make, each made here once.

The plan (:mod:`tuning.model.memory`, on a meta-device model built from the config) and the run
(:mod:`tuning.train`, on the loaded model) call the same functions, so the plan counts what the run
allocates: which loss runs (label-only or the model's own), whether batches are padding-free, the
label-only chunk size, and how the processes share the work. ``tests/test_decisions.py`` asserts that a
plan and a real trainer agree on every one of them for a grid of flags.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tuning.compat import transformers as hf
from tuning.errors import UserError
from tuning.model.vision import is_image_text

# Trained positions projected through the output head at once by the label-only loss: at most this many
# rows of logits (and their gradient) are alive, which is what the plan counts.
LABEL_ONLY_CHUNK_TOKENS = 2048

# Architectures (config.model_type) whose label-only loss tests/test_loss.py proves equal to the model's
# own, logit transforms and router auxiliary loss included. ``auto`` uses label_only for these without a
# check; any other architecture is checked on its first batch (tuning/train/loss.py) and the plan counts
# the model's own loss for it, since it cannot know that check's outcome. Add a type here together with
# its case in the test.
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

Loss = Literal["label_only", "standard"]


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` module under distributed and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DeepSpeed
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def label_only_blocker(model: torch.nn.Module) -> str | None:
    """Why this model's structure rules out the label-only loss (None: it allows it). Reads only class
    and config facts, so the plan's meta-device model answers as the loaded one does."""
    lm = causal_lm(model)
    if not hasattr(lm, "get_decoder") or not isinstance(lm.get_output_embeddings(), torch.nn.Module):
        return f"{type(lm).__name__} has no separate decoder and output head"
    if getattr(lm.config, "is_encoder_decoder", False):
        return "the model is an encoder-decoder"
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        return f"{type(lm).__name__}.forward takes no logits_to_keep"
    if getattr(lm.config, "output_router_logits", False) and not hasattr(lm, "router_aux_loss_coef"):
        # transformers' MoE models add router_aux_loss_coef × aux_loss; one without the attribute adds
        # something we cannot copy
        return f"{type(lm).__name__} adds a router loss without router_aux_loss_coef"
    return None


@dataclass(frozen=True)
class LossDecision:
    """``loss``: what runs from the first step. ``verify``: auto on an architecture outside the verified
    list with nothing else against label-only: the run checks label-only against the model's own loss on
    its first batch and switches to it when they agree; until then (and in the plan) it is ``standard``."""

    loss: Loss
    verify: bool
    why: str  # one clause for the log line and the plan

    @property
    def planned(self) -> str:
        """What the memory plan counts, in words."""
        if self.verify:
            return "standard (label_only only after the first batch verifies it)"
        return self.loss


def decide_loss(
    requested: str,
    model_type: str | None,
    blocker: str | None,
    *,
    use_liger_kernel: bool = False,
    label_smoothing_factor: float = 0.0,
) -> LossDecision:
    """Which loss runs for ``--loss_implementation requested``: label-only where it is exact and
    applicable, the model's own otherwise. ``blocker``: :func:`label_only_blocker` of the model.
    Raises a user error when label_only is asked for and cannot run."""
    if use_liger_kernel:
        blocker = "--use_liger_kernel computes the loss with its own fused kernel"
    elif label_smoothing_factor:
        blocker = "--label_smoothing_factor: the Trainer smooths the labels over the full logits"
    if requested == "standard":
        return LossDecision("standard", False, "asked for")
    if blocker:
        if requested == "label_only":
            raise UserError(f"--loss_implementation label_only cannot run: {blocker}; use auto or standard")
        return LossDecision("standard", False, f"label_only not used: {blocker}")
    if requested == "label_only":
        unverified = model_type not in VERIFIED_ARCHITECTURES
        return LossDecision(
            "label_only", False, "asked for" + (" (architecture not verified)" if unverified else "")
        )
    if model_type in VERIFIED_ARCHITECTURES:
        return LossDecision("label_only", False, f"auto: {model_type} is verified")
    return LossDecision("standard", True, f"auto: {model_type} is not verified; checked on the first batch")


# --- padding-free batches ---


def padding_free_blocker(model: Any, attention: str | None = None) -> str | None:
    """Why one padding-free row would not equal a padded batch for this model (None: it would).

    ``attention``: the kernel the run uses (default: the one the model's config names).
    """
    config = getattr(model, "peft_config", None)
    if config and any(getattr(c, "is_prompt_learning", False) for c in config.values()):
        return "prompt tuning prepends its virtual tokens once per row, not once per sample"
    if getattr(model.config, "use_cache", False):
        # with a cache object transformers skips the per-sample mask and samples attend to each other
        return "model.config.use_cache is true"
    base = getattr(model, "get_base_model", lambda: model)()
    if is_image_text(base.config):
        # image features and position ids (Qwen2.5-VL's 3-D rope, Mllama's cross-attention) are built per row
        return (
            f"{base.config.model_type} is an image-text model, whose image features are placed per padded row"
        )
    if not type(base).__module__.startswith("transformers."):
        # remote code may build its own mask and ignore restarting position_ids
        return f"{type(base).__name__} is not a transformers model class (remote code)"
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no position_ids"
    if attention is None:
        attention = hf.attn_implementation(base.config)
    if "flash" not in attention and not hf.mask_reads_position_ids(getattr(base, "model", base)):
        # flash kernels split samples at restarting position_ids themselves; eager/sdpa/flex need a
        # mask built from them, and e.g. GptOssModel (transformers 5.24) builds its mask without them:
        # packed samples would attend to each other (measured: a second sample's logits off by 7.7)
        return f"{type(getattr(base, 'model', base)).__name__} builds its {attention} attention mask without position_ids"
    return None


def padding_free_decision(requested: bool, blocker: str | None, packed: bool = False) -> bool:
    """Whether batches are padding-free: when asked for and exact (``blocker`` None). ``packed`` rows
    (``--packing_strategy bfd``) stay apart only padding-free, so there a blocker is a user error."""
    if packed and blocker is not None:
        raise UserError(
            f"--packing_strategy bfd keeps packed samples apart through padding-free batches, which "
            f"are not exact here: {blocker}; drop --packing, or pass --packing_strategy wrapped "
            "(samples in a row then attend to each other)"
        )
    return packed or (requested and blocker is None)


# --- processes ---

Engine = Literal["none", "ddp", "fsdp", "deepspeed"]


@dataclass(frozen=True)
class Topology:
    """How many processes share the work, and whether FSDP shards weights, gradients and optimizer state."""

    world_size: int = 1
    sharded: bool = False
    activation_checkpointing: bool = False  # FSDP's own (fsdp_activation_checkpointing)
    offload: bool = False  # fsdp_offload_params: sharded state lives in CPU RAM between uses
    engine: Engine = "none"


def topology_of(
    processes: int,
    *,
    fsdp: bool = False,
    deepspeed: bool = False,
    activation_checkpointing: bool = False,
    offload: bool = False,
) -> Topology:
    """The topology from what the launch says (the plan reads the accelerate config file, the run the
    environment accelerate exported from it): the one rule both apply."""
    if processes < 1:
        raise UserError(f"--num_processes must be at least 1, got {processes}")
    engine: Engine = "fsdp" if fsdp else "deepspeed" if deepspeed else "ddp" if processes > 1 else "none"
    return Topology(
        world_size=processes,
        sharded=fsdp and processes > 1,
        activation_checkpointing=fsdp and activation_checkpointing,
        offload=fsdp and offload,
        engine=engine,
    )
