"""Adapters: wrap the loaded model for LoRA, activated LoRA (aLoRA) or prompt tuning.

peft does the wrapping, training hooks and saving; this module turns flags into its configs, checks
target names against the model (peft's own error doesn't list what would have matched), grows the
vocabulary only for ``--add_special_tokens`` and makes exactly the new rows trainable, and writes the
files a server needs next to the adapter (``added_tokens_info.json``, ``new_embeddings.safetensors``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

from tuning.config import PeftArgs
from tuning.errors import UserError, first_line
from tuning.model.loading import PrecisionPlan
from tuning.model.quantization import prepare_quantized_base
from tuning.model.vision import lora_exclusions

logger = logging.getLogger(__name__)

ADDED_TOKENS_INFO_NAME = "added_tokens_info.json"
NEW_EMBEDDINGS_NAME = "new_embeddings.safetensors"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# the key names vLLM reads from new_embeddings.safetensors
NEW_EMBEDDING_KEYS = {"input": "input_embeddings", "output": "output_embeddings"}


@dataclass(frozen=True)
class AddedTokens:
    """The vocabulary growth an adapter carries: rows ``base_rows`` .. ``new_embedding_size - 1`` are new."""

    num_new_tokens: int
    base_rows: int
    new_embedding_size: int
    trainable_ids: tuple[int, ...]
    separate_file: bool


def apply_peft(args: PeftArgs, model: Any, tokenizer: Any, plan: PrecisionPlan) -> Any:
    """Wrap ``model`` for ``args.peft_method`` (unchanged for none); returns the model to train."""
    if args.peft_method == "none":
        return model
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        prepare_quantized_base(model)  # QLoRA
    added = _grow_vocabulary(args, model, tokenizer)
    peft_model = wrap(args, model, tokenizer, plan, added)
    if plan.autocast is not None:
        _upcast_trainable(peft_model)
    if args.peft_method != "pt":
        # checkpointed blocks only backpropagate into adapters when their input requires grad; the frozen
        # embedding's output doesn't, so mark it (costs one extra input-gradient through the first block)
        peft_model.enable_input_require_grads()
    # the Trainer saves checkpoints and the final adapter through this method
    peft_model.save_pretrained = functools.partial(_save_adapter, peft_model.save_pretrained, added)
    peft_model.tuning_added_tokens = added  # read by write_adapter_extras when the final adapter is saved
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("peft %s: %d of %d parameters train", args.peft_method, trainable, total)
    if args.peft_method != "pt":
        logger.info("peft %s wraps %s", args.peft_method, wrapped_summary(peft_model))
    return peft_model


def wrap(
    args: PeftArgs, model: Any, tokenizer: Any, plan: PrecisionPlan, added: AddedTokens | None = None
) -> Any:
    """peft's wrapper for ``args`` around ``model``; also what the memory plan counts on a meta-device model."""
    if args.peft_method == "pt":
        config: Any = _prompt_tuning_config(args, tokenizer)
    else:
        config = _lora_config(args, model, tokenizer, added)
    try:
        return get_peft_model(model, config, autocast_adapter_dtype=plan.autocast is not None)
    except ValueError as e:
        raise UserError(f"cannot apply --peft_method {args.peft_method}: {first_line(e)}") from None


def _save_adapter(save: Any, added: AddedTokens | None, folder: str, *args: Any, **kwargs: Any) -> None:
    """peft's save, without whole embedding matrices and with ``added_tokens_info.json``.

    trainable_token_indices already hold every new row; peft's ``save_embedding_layers="auto"`` would also
    store the whole resized embedding and output matrices (vocab x hidden) in every checkpoint.
    """
    save(folder, *args, save_embedding_layers=False, **kwargs)
    if added is not None and (Path(folder) / ADAPTER_CONFIG_NAME).is_file():  # only the rank that wrote
        info = {"num_new_tokens": added.num_new_tokens, "new_embedding_size": added.new_embedding_size}
        (Path(folder) / ADDED_TOKENS_INFO_NAME).write_text(
            json.dumps(info, indent=2) + "\n", encoding="utf-8"
        )


def _upcast_trainable(model: Any) -> None:
    """Float32 master copies of the trainable (adapter) weights; the frozen base stays in half precision."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _init_weights(value: str) -> bool | str:
    lowered = str(value).lower()
    return {"true": True, "false": False}.get(lowered, value)


def _lora_config(args: PeftArgs, model: Any, tokenizer: Any, added: AddedTokens | None) -> LoraConfig:
    invocation = None
    if args.peft_method == "alora":
        invocation = tokenizer.encode(args.alora_invocation_string, add_special_tokens=False)
        logger.info("alora: invocation %r is tokens %s", args.alora_invocation_string, invocation)
    ours = dict(
        task_type=TaskType.CAUSAL_LM,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=resolve_target_modules(args.target_modules, model),
        exclude_modules=lora_exclusions(model, args.exclude_modules),
        target_parameters=args.target_parameters,
        modules_to_save=_check_names(args.modules_to_save, model, "--modules_to_save"),
        bias=args.bias,
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,
        init_lora_weights=_init_weights(args.init_lora_weights),
        layers_to_transform=args.layers_to_transform,
        lora_bias=args.lora_bias,
        alora_invocation_tokens=invocation,
        trainable_token_indices=_trainable_token_indices(model, added),
        ensure_weight_tying=bool(added and model.config.get_text_config().tie_word_embeddings),
    )
    # --lora_config_kwargs (fms-hf-tuning job files' further LoraConfig keys) may also set what we derive
    # (trainable_token_indices, alora_invocation_tokens, ensure_weight_tying): the user's value wins
    return LoraConfig(**{**ours, **(args.lora_config_kwargs or {})})


def _prompt_tuning_config(args: PeftArgs, tokenizer: Any) -> PromptTuningConfig:
    text = args.prompt_tuning_init == "TEXT"
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=args.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=args.prompt_tuning_init_text if text else None,
        tokenizer_name_or_path=tokenizer.name_or_path if text else None,
    )


def module_names(model: Any) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def linear_module_names(model: Any) -> list[str]:
    """Distinct last name parts of the model's linear layers (what ``--target_modules`` takes)."""
    names = [name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if is_linear(mod)]
    return sorted(set(names))


def is_linear(module: torch.nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family) is a linear layer with transposed weights; peft adapts both
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _suffix_of(model: Any, module: torch.nn.Module | None) -> str | None:
    return next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and m is module), None)


def _matches(target: str, names: list[str]) -> bool:
    return any(name == target or name.endswith("." + target) for name in names)


def resolve_target_modules(targets: list[str] | None, model: Any) -> list[str] | None:
    """Expand ``all-linear`` (without the output head unless named) and check every name matches."""
    if not targets:
        return None
    resolved = [t for t in targets if t != "all-linear"]
    if "all-linear" in targets:
        head = _suffix_of(model, model.get_output_embeddings())
        resolved = [n for n in linear_module_names(model) if n != head] + resolved
    resolved = list(dict.fromkeys(resolved))
    return _check_names(resolved, model, "--target_modules")


def _check_names(names: list[str] | None, model: Any, flag: str) -> list[str] | None:
    if not names:
        return names
    every = module_names(model)
    missing = [n for n in names if not _matches(n, every)]
    if missing:
        raise UserError(
            f"{flag} {', '.join(missing)} matches no module of {model.config.model_type} model "
            f"{model.name_or_path}; its linear modules are: {', '.join(linear_module_names(model))}; "
            "pass some of those, or all-linear"
        )
    return names


def _grow_vocabulary(args: PeftArgs, model: Any, tokenizer: Any) -> AddedTokens | None:
    """Round the embeddings up for added tokens and pick the rows that must train (None: none added)."""
    base_rows = AutoConfig.from_pretrained(model.name_or_path).get_text_config().vocab_size
    try:  # the unmodified tokenizer tells which ids are new (they may fit in spare rows of the base)
        base_tokens = len(AutoTokenizer.from_pretrained(tokenizer.name_or_path))
    except (OSError, ValueError):
        base_tokens = min(base_rows, len(tokenizer))
    if len(tokenizer) == base_tokens:
        return None
    if args.peft_method == "pt":
        raise UserError(
            "--add_special_tokens with --peft_method pt: prompt tuning trains no embedding rows, so the new "
            "tokens would stay random; use --peft_method lora, or drop --add_special_tokens"
        )
    multiple = args.embedding_size_multiple_of
    size = max(base_rows, math.ceil(len(tokenizer) / multiple) * multiple)
    if size != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(size)
    # the new tokens' rows, and the rounding rows, whose random start would otherwise differ on reload
    trainable = sorted(set(range(base_tokens, len(tokenizer))) | set(range(base_rows, size)))
    if args.save_new_embeddings_separately and trainable[0] < base_rows:
        raise UserError(
            f"--save_new_embeddings_separately: the new tokens reuse rows {trainable[0]}.. of the base "
            f"model's {base_rows}-row embeddings, which a separate file can't describe; drop the flag"
        )
    logger.info("added %d tokens: embeddings %d → %d rows", len(tokenizer) - base_tokens, base_rows, size)
    return AddedTokens(
        len(tokenizer) - base_tokens, base_rows, size, tuple(trainable), args.save_new_embeddings_separately
    )


def _trainable_token_indices(model: Any, added: AddedTokens | None) -> dict[str, list[int]] | None:
    if added is None:
        return None
    ids = list(added.trainable_ids)
    embed = _suffix_of(model, model.get_input_embeddings())
    head = _suffix_of(model, model.get_output_embeddings())
    if model.config.get_text_config().tie_word_embeddings or head is None:
        return {embed: ids}  # the tied head follows (ensure_weight_tying)
    return {embed: ids, head: ids}


def write_adapter_extras(model: Any, folder: Path) -> None:
    """For the final adapter with ``--save_new_embeddings_separately``: split the new rows out."""
    added: AddedTokens | None = getattr(model, "tuning_added_tokens", None)
    if not isinstance(model, PeftModel) or added is None or not (folder / ADAPTER_WEIGHTS_NAME).exists():
        return  # not an adapter run, no tokens added, or a rank that doesn't write files
    if added.separate_file:
        split_new_embeddings(folder, model)


def split_new_embeddings(folder: Path, model: Any) -> None:
    """Move the new embedding rows out of the adapter into ``new_embeddings.safetensors`` (vLLM's format:
    ``input_embeddings`` / ``output_embeddings``, one row per id from the base vocabulary size up)."""
    added: AddedTokens = model.tuning_added_tokens
    weights = load_file(folder / ADAPTER_WEIGHTS_NAME)
    kept = {k: v for k, v in weights.items() if "trainable_tokens" not in k}
    base = model.get_base_model()
    rows = torch.tensor(added.trainable_ids)
    tables = {NEW_EMBEDDING_KEYS["input"]: _effective_rows(base.get_input_embeddings(), rows)}
    if base.get_output_embeddings() is not None:
        tables[NEW_EMBEDDING_KEYS["output"]] = _effective_rows(base.get_output_embeddings(), rows)
    save_file({k: v.contiguous() for k, v in tables.items()}, folder / NEW_EMBEDDINGS_NAME)
    save_file(kept, folder / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    config_path = folder / ADAPTER_CONFIG_NAME
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["trainable_token_indices"] = None
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _effective_rows(layer: Any, rows: torch.Tensor) -> torch.Tensor:
    """The trained values of ``rows`` of an embedding/head wrapped by peft's trainable tokens."""
    adapter = getattr(layer, "token_adapter", None)
    with torch.no_grad():
        weight = adapter.get_merged_weights(adapter.active_adapters) if adapter is not None else layer.weight
        return weight[rows].detach().to("cpu").clone()


# --- what was wrapped (issue 8: on a mixture-of-experts, all-linear leaves the router and experts alone) ---


def wrapped_summary(peft_model: Any) -> str:
    """``"8 modules (k_proj, o_proj, q_proj, v_proj)"`` (``, parameters: experts.down_proj`` when
    ``--target_parameters`` adapted some): the names peft adapted.

    A MoE router (gpt-oss: ``GptOssTopKRouter``) and the 3-D expert tensors are not ``nn.Linear``, so
    all-linear never matches them; they are adapted only when named in ``--target_parameters``.
    """
    tuner = peft_model.base_model
    modules = list(getattr(tuner, "targeted_module_names", []))
    params = list(getattr(tuner, "targeted_parameter_names", []))
    suffixes = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in modules}))
    named = ", ".join(sorted({".".join(n.split(".")[-2:]) for n in params}))
    return f"{len(modules)} modules ({suffixes or 'none'})" + (f", parameters: {named}" if named else "")
