"""Model stage: config, dtype and mixed-precision plan, attention kernel with fallback, embeddings."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
)

from tuning.compat import transformers as hf
from tuning.config import KAHAN_OPTIMIZERS, ModelArgs
from tuning.dtypes import torch_dtype
from tuning.errors import UserError, first_line
from tuning.files import refused_pickle
from tuning.model.quantization import is_bnb, keep_training_layout, quantized_load_kwargs
from tuning.model.sources import check_source, model_source, source_error
from tuning.model.vision import freeze_vision, is_image_text, model_auto_class, present_layer_classes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecisionPlan:
    """How weights are stored, how the forward pass computes, and how the optimizer keeps precision.

    ``load_dtype`` is the dtype of the weights in memory; ``autocast`` is the half-precision dtype
    the forward computes in (None: compute in ``load_dtype``); ``master_weights`` is the resolved
    ``--master_weights``: ``float32`` (trainable weights and optimizer state in float32), ``kahan``
    (weights and state in bfloat16, Kahan-compensated AdamW: tuning/train/optimizers.py) or ``half``.
    Plain AdamW on bfloat16 weights loses updates below bf16's resolution (measured: loss 10.19 → 10.13
    vs 9.42 in float32 on the same job at lr 1e-5); float32 and kahan don't (benchmarks/RESULTS.md).
    """

    load_dtype: torch.dtype
    autocast: torch.dtype | None
    save_dtype: torch.dtype
    master_weights: str = "float32"


def load_model_config(args: ModelArgs) -> PretrainedConfig:
    check_source(args.model_name_or_path, "--model_name_or_path")
    try:
        return AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise source_error(args.model_name_or_path, "--model_name_or_path", "config.json", e) from None


def context_length(config: PretrainedConfig, requested: int) -> int:
    """``max_seq_length`` capped by the model's context window."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and requested > limit:
        logger.info("max_seq_length %d exceeds the model's context %d; using %d", requested, limit, limit)
        return int(limit)
    return requested


def precision_plan(
    args: ModelArgs, config: PretrainedConfig, peft_method: str = "none", optim: str = "adamw_torch"
) -> PrecisionPlan:
    """Resolve ``torch_dtype`` (and ``auto``) and ``--master_weights`` into storage, compute and save dtypes.

    With an adapter (``peft_method`` not none) the frozen base weights never receive updates, so they
    stay in the half dtype; under ``float32`` master weights only the adapter's trainable weights are
    upcast (tuning/model/peft.py).
    """
    dtype = resolve_dtype(args, config)
    master = resolve_master_weights(args, dtype, peft_method, optim)
    if dtype == torch.float32 or master != "float32":
        return PrecisionPlan(load_dtype=dtype, autocast=None, save_dtype=dtype, master_weights=master)
    if peft_method != "none":
        return PrecisionPlan(load_dtype=dtype, autocast=dtype, save_dtype=dtype)
    return PrecisionPlan(load_dtype=torch.float32, autocast=dtype, save_dtype=dtype)


def resolve_dtype(args: ModelArgs, config: PretrainedConfig) -> torch.dtype:
    """``--torch_dtype`` as a torch dtype (``auto``: the checkpoint's; float16 without a GPU: bfloat16)."""
    name = args.torch_dtype
    if name == "auto":
        native = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = native if isinstance(native, torch.dtype) else getattr(torch, str(native), torch.float32)
    else:
        dtype = torch_dtype(name)
    if dtype == torch.float16 and not torch.cuda.is_available():
        logger.warning("torch_dtype float16 needs a GPU for mixed precision; computing in bfloat16 instead")
        dtype = torch.bfloat16
    return dtype


def resolve_master_weights(args: ModelArgs, dtype: torch.dtype, peft_method: str, optim: str) -> str:
    """``--master_weights auto`` → ``kahan`` for full fine-tuning in bfloat16 with an AdamW optimizer,
    else ``float32`` (adapters are small; float16 needs float32 masters for loss scaling; another
    ``--optim`` keeps its own precision). An explicit choice is checked against the resolved dtype."""
    requested = args.master_weights
    if requested == "kahan" and dtype != torch.bfloat16:
        raise UserError(
            f"--master_weights kahan keeps bfloat16 weights, but the weights are {str(dtype).removeprefix('torch.')}; "
            "pass --torch_dtype bfloat16, or --master_weights float32"
        )
    if dtype == torch.float32:
        return "float32"  # nothing is half precision: float32 and half are the same
    if requested != "auto":
        return requested
    full_bf16_adamw = peft_method == "none" and dtype == torch.bfloat16 and optim in KAHAN_OPTIMIZERS
    return "kahan" if full_bf16_adamw else "float32"


def attention_candidates(args: ModelArgs, model_class: type | None = None) -> list[str]:
    """Kernels to try, in order: the requested one; for a flash request, the model's own first listed
    flash kernel (gpt-oss names kernels-community/vllm-flash-attn3) and flash_attention_2; sdpa; eager."""
    requested = args.flash_attn_implementation if args.use_flash_attn else "sdpa"
    chain = [requested]
    if _is_flash(requested):
        chain += (hf.attention_support(model_class)[2] if model_class is not None else [])[:1]
        chain.append("flash_attention_2")
    return list(dict.fromkeys([*chain, "sdpa", "eager"]))


def _is_flash(impl: str) -> bool:
    return impl.startswith("flash_attention") or "/" in impl  # "/": a hub kernel id


def model_refuses(impl: str, model_class: type) -> str | None:
    """Why the model class itself can't run ``impl`` (checked before loading, so no weights are read twice)."""
    name = model_class.__name__
    sdpa, flash, compatible = hf.attention_support(model_class)
    if impl == "sdpa" and not sdpa:
        return f"{name} does not support sdpa"
    if not _is_flash(impl):
        return None
    if not flash:
        return f"{name} does not support flash attention"
    if compatible and impl not in compatible:
        # gpt-oss: its attention sinks (a learned per-head logit) are only in these kernels
        return f"{name} runs flash attention only with {', '.join(compatible)} (attention sinks)"
    return None


def why_unusable(impl: str, model_class: type | None = None) -> str | None:
    """Why an attention implementation can't run here (None: it may; loading still has a say)."""
    refused = model_refuses(impl, model_class) if model_class is not None else None
    if refused or impl in ("sdpa", "eager", "flex_attention"):
        return refused
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    if "/" in impl:
        return None if importlib.util.find_spec("kernels") else "the 'kernels' package is not installed"
    package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(impl)
    if package and importlib.util.find_spec(package) is None:
        return f"the '{package}' package is not installed"
    return None


def causal_lm_class(config: PretrainedConfig) -> type | None:
    """The transformers class AutoModelForCausalLM picks (None for remote code: loading decides)."""
    for mapping in (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING):
        if type(config) in mapping:
            return mapping[type(config)]
    return None


def load_model(
    args: ModelArgs,
    plan: PrecisionPlan,
    tokenizer: Any,
    quantization: Any = None,
    config: PretrainedConfig | None = None,
) -> Any:
    """Load the model with the first usable attention kernel; one warning line on fallback.

    ``quantization``: a transformers quantization config (tuning/model/quantization.py), or None.
    ``config``: the model config when the caller already loaded it (read again otherwise).
    """
    config = config or load_model_config(args)
    model_class = causal_lm_class(config)
    candidates = attention_candidates(args, model_class)
    if any("/" in impl for impl in candidates):  # a Hub kernel: its loader's warnings count (tuning/logs.py)
        logging.getLogger("kernels").setLevel(logging.NOTSET)
    reasons: list[str] = []
    for impl in candidates:
        reason = why_unusable(impl, model_class)
        if reason is None:
            try:
                model = model_auto_class(config).from_pretrained(
                    model_source(args.model_name_or_path),
                    dtype=plan.load_dtype,
                    attn_implementation=impl,
                    trust_remote_code=args.trust_remote_code,
                    quantization_config=quantization,
                    **quantized_load_kwargs(quantization),
                )
                break
            except Exception as e:  # noqa: BLE001 (sorted by _load_failure: a kernel's failure is a fallback)
                reason = _load_failure(args, impl, e)
        reasons.append(f"{impl}: {reason}")
    else:
        raise UserError(f"no attention implementation works for this model ({'; '.join(reasons)})")
    if impl != candidates[0]:
        # the default request (flash_attention_2: --use_flash_attn defaults to true, as in fms-hf-tuning)
        # can't run without a GPU, and the run-start line says which kernel runs; a kernel the user named,
        # or any fallback on a GPU, is news
        default = candidates[0] == ModelArgs.flash_attn_implementation
        log = logger.debug if default and not torch.cuda.is_available() else logger.warning
        log("attention: asked for %s, using %s (%s)", candidates[0], impl, "; ".join(reasons))
    drop_stale_quantization_config(model)
    if is_bnb(quantization):
        keep_training_layout(model)
    # The KV cache is for generation; training never reads it, and with a cache object transformers skips
    # the per-sample mask that keeps padding-free rows exact. The base's value is what a saved model
    # must carry (generation recomputes every token without it): see generation_use_cache.
    model.tuning_base_use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    model.tuning_base_special_ids = _special_ids(model)
    model.tuning_base_vocab = model.get_input_embeddings().weight.shape[0]
    _resize_for_added_tokens(model, tokenizer)
    if is_image_text(config):
        freeze_vision(model, args)
        present_layer_classes(model)  # FSDP wraps the tower's and the decoder's layers by these
    return model


# Ids transformers' Trainer.train() overwrites with the tokenizer's (align_special_tokens: a Qwen3 config's
# pad_token_id null becomes 151643, with a warning), in the config and the generation config.
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _special_ids(model: Any) -> dict[tuple[str, str], Any]:
    ids = {}
    for where, config in _configs(model).items():
        for name in SPECIAL_IDS:
            value = getattr(config, name, None)
            ids[(where, name)] = list(value) if isinstance(value, list) else value
    return ids


def _configs(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    found = {"config": config.get_text_config()} if config is not None else {}
    if getattr(model, "generation_config", None) is not None:
        found["generation_config"] = model.generation_config
    return found


def _new_token(value: Any, base_vocab: int | None) -> bool:
    """Whether ``value`` (an id or a list of ids) names a token the run added to the vocabulary."""
    ids = value if isinstance(value, list) else [value]
    return base_vocab is not None and any(isinstance(i, int) and i >= base_vocab for i in ids)


@contextmanager
def generation_use_cache(model: Any) -> Iterator[None]:
    """While saving: the config's ``use_cache`` and the special-token ids of the config and generation
    config are the base model's again, so a saved ``config.json`` generates like the base did. load_model
    turned the cache off for training, and the Trainer aligned the ids with the tokenizer's; an id the run
    added to the vocabulary (``--add_special_tokens``) is kept, since the base has no such token."""
    config = getattr(model, "config", None)
    base = getattr(model, "tuning_base_use_cache", None)  # peft wrappers forward the lookup to the base
    targets = _configs(model)
    base_ids = getattr(model, "tuning_base_special_ids", None) or {}
    base_vocab = getattr(model, "tuning_base_vocab", None)
    changed: list[tuple[Any, str, Any]] = []
    if config is not None and base is not None and getattr(config, "use_cache", None) != base:
        changed.append((config, "use_cache", base))
    for (where, name), value in base_ids.items():
        target = targets.get(where)
        current = getattr(target, name, None)
        if target is not None and current != value and not _new_token(current, base_vocab):
            changed.append((target, name, value))
    training = [(target, name, getattr(target, name, None)) for target, name, _ in changed]
    for target, name, value in changed:
        setattr(target, name, value)
    try:
        yield
    finally:
        for target, name, value in training:
            setattr(target, name, value)


def _load_failure(args: ModelArgs, impl: str, e: Exception) -> str:
    """The reason to try the next kernel, or a UserError / the original error when it isn't the kernel's.

    A hub kernel fails in many ways (offline, no build for this GPU, missing package) and the next
    candidate loads the same weights, so any real model error still surfaces there.
    """
    refused = refused_pickle(e, f"model folder {args.model_name_or_path}")
    if refused is not None:
        raise refused from None
    first = first_line(e)
    about_attention = "attn" in first.lower() or "attention" in first.lower()
    if "/" in impl or (isinstance(e, (ValueError, ImportError)) and about_attention):
        return first
    if isinstance(e, OSError):
        raise UserError(f"cannot load model weights from {args.model_name_or_path}: {first}") from None
    if isinstance(e, (ValueError, ImportError)):
        raise UserError(f"cannot load model {args.model_name_or_path}: {e}") from None
    raise e


def drop_stale_quantization_config(model: Any) -> None:
    """A model whose weights were dequantized must not say it is quantized: saved with a stale
    ``quantization_config`` it would be reloaded as MXFP4 (transformers 5 drops it itself when it
    dequantizes on load; earlier releases kept it, and a later save wrote it out)."""
    stale = getattr(model.config, "quantization_config", None) is not None
    if stale and not getattr(model, "is_quantized", False):
        del model.config.quantization_config
        logger.info("weights are dequantized: removed quantization_config from the model config")


def _resize_for_added_tokens(model: Any, tokenizer: Any) -> None:
    """Grow the embeddings only when the user added tokens (the vocabulary otherwise stays the base's)."""
    weight = model.get_input_embeddings().weight
    current = getattr(weight, "ds_shape", weight.shape)[0]  # DeepSpeed ZeRO-3: the weight is a placeholder
    if len(tokenizer) > current:
        model.resize_token_embeddings(len(tokenizer))
        logger.info("resized embeddings from %d to %d for added tokens", current, len(tokenizer))
