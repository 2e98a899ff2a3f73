"""fms-hf-tuning 3.2's flags and keys, and the transformers-4 names its job files still carry, mapped onto
this tool's flags once, for the command line and job files alike (docs/fms-compat.md is the table).

Two kinds of entry:

- a *spelling* (:data:`LEGACY`): an old or foreign name for one of our flags, rewritten before parsing
  (``--evaluation_strategy`` → ``--eval_strategy``, ``"r"`` → ``lora_r``, ``--padding_free huggingface``
  → ``--padding_free true``), or a transformers-4 switch that has no effect in transformers 5, dropped;
  each logs one line saying what it became;
- an fms-acceleration flag (:class:`FmsArgs`): a flag of its own, whose meaning on our machinery is
  decided by :func:`resolve_fms` after parsing (a token budget for ``--multipack``, Liger kernels for
  ``--fast_kernels``), or refused in one line naming what would have to be installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from tuning.errors import UserError

logger = logging.getLogger(__name__)

Tokens = list[str]


@dataclass(frozen=True)
class Spelling:
    """``new``: the flag the old name becomes (None: dropped); ``note``: the one line logged; ``convert``:
    the old value's tokens → the new flag's tokens (None: the tokens are kept; an empty result drops it)."""

    new: str | None
    note: str
    convert: Callable[[Tokens], Tokens] | None = None


def _true(tokens: Tokens) -> bool:
    return not tokens or tokens[0].strip().lower() in ("true", "1", "yes")


def _when_true(value: str) -> Callable[[Tokens], Tokens]:
    return lambda tokens: [value] if _true(tokens) else []


def _padding_free(tokens: Tokens) -> Tokens:
    # fms: --padding_free METHOD, where "huggingface" (the only method) switches it on
    if tokens and tokens[0].strip().lower() == "huggingface":
        logger.info("--padding_free huggingface: padding-free batches are this tool's default path")
        return ["true"]
    return tokens


def _split_commas(tokens: Tokens) -> Tokens:
    # fms-hf-tuning takes --tracker aim,mlflow as well as --tracker aim mlflow
    return [name.strip() for token in tokens for name in token.split(",") if name.strip()]


def _json(key: str, value: Callable[[Tokens], Any]) -> Callable[[Tokens], Tokens]:
    return lambda tokens: [json.dumps({key: value(tokens)})]


def _dropped(why: str) -> Spelling:
    return Spelling(None, why)


_T5 = "transformers 5 removed it"
# old name → what it is now. transformers-4 TrainingArguments fields that transformers 5 removed or renamed
# (compared field by field, 4.55 → 5.x), then fms-hf-tuning's own spellings.
LEGACY: dict[str, Spelling] = {
    "evaluation_strategy": Spelling("eval_strategy", "transformers renamed it"),
    "per_gpu_train_batch_size": Spelling("per_device_train_batch_size", "transformers renamed it"),
    "per_gpu_eval_batch_size": Spelling("per_device_eval_batch_size", "transformers renamed it"),
    "no_cuda": Spelling("use_cpu", "transformers renamed it"),
    "include_inputs_for_metrics": Spelling("include_for_metrics", _T5, _when_true("inputs")),
    "push_to_hub_model_id": Spelling("hub_model_id", "transformers renamed it"),
    "push_to_hub_token": Spelling("hub_token", "transformers renamed it"),
    "torchdynamo": Spelling("torch_compile_backend", "transformers renamed it"),
    "group_by_length": Spelling("train_sampling_strategy", _T5, _when_true("group_by_length")),
    "adafactor": Spelling("optim", _T5, _when_true("adafactor")),
    "fsdp_transformer_layer_cls_to_wrap": Spelling(
        "fsdp_config", "transformers moved it into fsdp_config", _json("transformer_layer_cls_to_wrap", list)
    ),
    "fsdp_min_num_params": Spelling(
        "fsdp_config", "transformers moved it into fsdp_config", _json("min_num_params", lambda t: int(t[0]))
    ),
    "logging_dir": Spelling("tensorboard_dir", "transformers 5 reads $TENSORBOARD_LOGGING_DIR instead"),
    "overwrite_output_dir": _dropped(
        f"{_T5}; here a rerun into an output_dir with checkpoints resumes from the newest (as fms-hf-tuning "
        "does); pass --resume_from_checkpoint false to start over"
    ),
    "save_safetensors": _dropped(f"{_T5}; checkpoints and the final model are always safetensors"),
    "use_mps_device": _dropped(f"{_T5}; the device is picked automatically"),
    "jit_mode_eval": _dropped(_T5),
    "use_ipex": _dropped(_T5),
    "fp16_opt_level": _dropped(f"{_T5} (Apex); mixed precision is torch autocast"),
    "half_precision_backend": _dropped(f"{_T5}; mixed precision is torch autocast"),
    "fp16_backend": _dropped(f"{_T5}; mixed precision is torch autocast"),
    "tpu_num_cores": _dropped(_T5),
    "tpu_metrics_debug": _dropped(_T5),
    "past_index": _dropped(_T5),
    "use_legacy_prediction_loop": _dropped(_T5),
    "mp_parameters": _dropped(_T5),
    "ray_scope": _dropped(_T5),
    "push_to_hub_organization": _dropped(f"{_T5}; name the organisation in --hub_model_id (org/name)"),
    # fms-hf-tuning's own names
    "padding_free": Spelling("padding_free", "", _padding_free),
    "tracker": Spelling("trackers", "", _split_commas),
    "trackers": Spelling("trackers", "", _split_commas),
    "fast_moe": Spelling("fast_moe", "", lambda tokens: tokens or ["true"]),
    # fms-hf-tuning lowercases these (its docs write "peft_method": "None")
    "peft_method": Spelling("peft_method", "", lambda tokens: [t.lower() for t in tokens]),
    "quantization_method": Spelling("quantization_method", "", lambda tokens: [t.lower() for t in tokens]),
    "bitsandbytes": Spelling("bnb_qlora", "fms-hf-tuning's documented name for --bnb_qlora"),
    "task_type": Spelling(None, "", lambda t: _only("task_type", t, "CAUSAL_LM")),
    "peft_type": Spelling(None, "", lambda t: _only("peft_type", t, "LORA")),
    "inference_mode": Spelling(None, "", lambda t: _only("inference_mode", t, "false")),
    "base_model_name_or_path": _dropped("peft fills it in from the model"),
    "revision": _dropped("peft's bookkeeping: the model is --model_name_or_path as given"),
    "auto_mapping": _dropped("peft's bookkeeping"),
    "peft_version": _dropped("peft's bookkeeping"),
}
# further peft.LoraConfig fields fms-hf-tuning passes through (its LoraConfig subclasses peft's): handed to
# peft as they are, through --lora_config_kwargs
LORA_PASSTHROUGH = (
    "fan_in_fan_out",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "velora_config",
    "use_qalora",
    "qalora_group_size",
    "monteclora_config",
    "layer_replication",
    "runtime_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "ensure_weight_tying",
)


def _only(key: str, tokens: Tokens, allowed: str) -> Tokens:
    value = tokens[0] if tokens else ""
    if value.strip().upper() != allowed.upper():
        raise UserError(
            f"--{key} {value}: this tool trains causal LMs with LoRA-style adapters; only {allowed}"
        )
    return []


def _typed(text: Any) -> Any:
    """A token (or a file's nested value) as the typed value peft takes."""
    return yaml.safe_load(text) if isinstance(text, str) else text


def translate(key: str, tokens: Tokens, given: set[str]) -> list[tuple[str, Tokens]]:
    """One flag's old or foreign name and value tokens → the (flag, tokens) pairs it means here (empty: it
    is dropped). ``given``: every flag name in the same job, so an old name and its new one together are
    caught."""
    if key in LORA_PASSTHROUGH:
        value = _typed(tokens[0]) if len(tokens) == 1 else [_typed(t) for t in tokens]
        return [("lora_config_kwargs", [json.dumps({key: value})])]
    spelling = LEGACY[key]
    if spelling.new and spelling.new != key and spelling.new in given:
        raise UserError(f"--{key} and --{spelling.new} are the same setting; pass only --{spelling.new}")
    out = spelling.convert(tokens) if spelling.convert else tokens
    if spelling.note:
        became = f"--{spelling.new} {' '.join(out)}".rstrip() if spelling.new and out else "ignored"
        logger.warning("--%s: %s; %s", key, spelling.note, became)
    return [(spelling.new, out)] if spelling.new and (out or not tokens) else []


def is_translated(key: str) -> bool:
    return key in LEGACY or key in LORA_PASSTHROUGH


def translate_argv(argv: list[str]) -> list[str]:
    """The command line with every old or foreign flag rewritten (:func:`translate`). A flag's tokens are
    the values up to the next flag (``--x=v`` too); nothing else on the line changes."""
    flags = [a.partition("=")[0][2:] for a in argv if a.startswith("--")]
    given = set(flags)
    out: list[str] = []
    merged: dict[str, dict] = {}  # JSON-object flags several old names feed (lora_config_kwargs, fsdp_config)
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        key = name[2:] if name.startswith("--") else None
        if key is None or not is_translated(key):
            out.append(arg)
            i += 1
            continue
        j = i + 1
        tokens = [inline] if eq else []
        if not eq:
            while j < len(argv) and not (argv[j].startswith("--") or argv[j] == "--"):
                tokens.append(argv[j])
                j += 1
        for new, values in translate(key, tokens, given - {key}):
            if new in ("lora_config_kwargs", "fsdp_config"):
                merged.setdefault(new, {}).update(json.loads(values[0]))
            else:
                out.extend([f"--{new}", *values])
        i = j
    for new, value in merged.items():
        out.extend([f"--{new}", json.dumps(value)])
    return out


def translate_file(values: dict[str, Any]) -> dict[str, Any]:
    """A config or job file's mapping with every old or foreign key rewritten, its values as the file
    gave them (text, a list of text, a mapping)."""
    given = set(values)
    out: dict[str, Any] = {}
    merged: dict[str, dict] = {}
    for key, value in values.items():
        if not is_translated(key) or (value is None and key in LEGACY and LEGACY[key].new == key):
            out[key] = value  # null: the flag's default (a resolved_config.yaml holds every flag)
            continue
        if value is None:
            continue
        if isinstance(value, dict):
            tokens = [json.dumps(value)]
        else:
            tokens = (
                [] if value is None else [str(v) for v in (value if isinstance(value, list) else [value])]
            )
        for new, new_tokens in translate(key, tokens, given - {key}):
            if new in ("lora_config_kwargs", "fsdp_config"):
                merged.setdefault(new, {}).update(json.loads(new_tokens[0]))
            elif isinstance(value, dict) and new == key:  # the flag's own check takes or refuses a mapping
                out[new] = value
            else:  # one token as a scalar: a flag taking a list takes one item that way too
                out[new] = new_tokens[0] if len(new_tokens) == 1 else (new_tokens or "true")
    for new, value in merged.items():
        if isinstance(out.get(new), dict):
            value = {**out[new], **value}
        out[new] = value
    return out


@dataclass
class FmsArgs:
    """fms-hf-tuning's acceleration and controller flags (its ``acceleration_configs``), each given its
    meaning here by :func:`resolve_fms`. Values are fms's positional lists (``--fast_kernels True True
    True``; in a job file ``"fast_kernels": [true, true, true]``)."""

    multipack: list[str] | None = field(
        default=None,
        metadata={
            "help": "fms-hf-tuning's multipack NUM_PROCESSES: token-balanced batches grouped by length across "
            "processes. Here: --max_tokens_per_batch per_device_train_batch_size x max_seq_length (unless "
            "set); NUM_PROCESSES (fms's length-counting workers) has no effect."
        },
    )
    fast_kernels: list[str] | None = field(
        default=None,
        metadata={
            "help": "fms-hf-tuning's FAST_LOSS FAST_RMS_LAYERNORM FAST_ROPE_EMBEDDINGS: FAST_LOSS is the "
            "label-only chunked loss (our default); the other two are Liger's kernels through transformers "
            "where they run (liger-kernel on a CUDA GPU), otherwise training runs without them (one line)."
        },
    )
    fused_lora: list[str] | None = field(
        default=None,
        metadata={
            "help": "fms-hf-tuning's BASE_LAYER FUSED_LORA (fms-acceleration-foak's fused LoRA kernels); needs "
            "packages that do not install beside this stack: exits 1 naming them."
        },
    )
    fast_moe: list[str] | None = field(
        default=None,
        metadata={
            "help": "fms-hf-tuning's [EP_DEGREE|true|false] (fms-acceleration-moe's ScatterMoE); needs packages "
            "that do not install beside this stack: exits 1 naming them."
        },
    )
    auto_gptq: list[str] | None = field(
        default=None,
        metadata={
            "help": "fms-hf-tuning's KERNEL [FROM_QUANTIZED] (GPTQ-LoRA on a GPTQ checkpoint): transformers loads "
            "GPTQ checkpoints through gptqmodel; exits 1 naming it when it is not installed."
        },
    )
    enable_reduce_loss_sum: bool = field(
        default=False,
        metadata={
            "help": "fms-hf-tuning's experimental sum reduction, meant to weigh every token equally across "
            "gradient accumulation: this tool's loss always does (trained-token sum over the whole "
            "accumulated step's trained tokens); accepted, one line."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "fms-hf-tuning's hub download folder: sets $HF_HUB_CACHE for this run."},
    )
    trainer_controller_config_file: str | None = field(
        default=None,
        metadata={
            "help": "fms-hf-tuning's trainer controller rules (YAML): metrics, rules and operations that stop "
            "training, save a checkpoint or log (docs/fms-compat.md)."
        },
    )


def resolve_fms(config: Any) -> None:
    """Give each fms-acceleration flag of ``config.fms`` its meaning on this tool's flags; refuse, in one
    line, what needs packages this stack can't hold. Called once after parsing, before validation."""
    fms: FmsArgs = config.fms
    train = config.train
    _kernel_plugins(fms, config.peft.peft_method)
    if fms.multipack is not None:
        if train.max_tokens_per_batch is None:
            train.max_tokens_per_batch = train.per_device_train_batch_size * config.data.max_seq_length
        logger.info(
            "--multipack: token-balanced batches grouped by length, --max_tokens_per_batch %d per process",
            train.max_tokens_per_batch,
        )
    if fms.fast_kernels is not None:
        _fast_kernels(fms.fast_kernels, train)
    if fms.enable_reduce_loss_sum:
        logger.info(
            "--enable_reduce_loss_sum: every trained token already weighs the same across the accumulated "
            "step here (loss = token sum / trained tokens); fms's extra scaling by the token count is not "
            "applied (scale --learning_rate for that)"
        )
    if config.trackers.training_logs_filename != "training_logs.jsonl":
        logger.warning(
            "--training_logs_filename %s: the log file is always training_logs.jsonl here (resume, "
            "tuning plot and the summary read it by that name)",
            config.trackers.training_logs_filename,
        )
    if fms.cache_dir:
        os.environ["HF_HUB_CACHE"] = fms.cache_dir
        logger.info("--cache_dir: hub downloads go to %s ($HF_HUB_CACHE)", fms.cache_dir)


def _kernel_plugins(fms: FmsArgs, peft_method: str) -> None:
    """fms-acceleration's kernel plugins: refused in one line where their packages can't be here."""
    if fms.fused_lora is not None:
        raise UserError(
            "--fused_lora needs fms-acceleration-foak's fused LoRA Triton kernels, which need fms-acceleration "
            "(it pins numpy<2; this stack has numpy 2) and a CUDA GPU: not installable here; drop "
            "--fused_lora (LoRA trains unfused, same results, slower)"
        )
    if fms.fast_moe is not None:
        raise UserError(
            "--fast_moe needs fms-acceleration-moe's ScatterMoE kernels, which need fms-acceleration (it pins "
            "numpy<2; this stack has numpy 2) and a CUDA GPU: not installable here; drop --fast_moe (MoE "
            "layers train with the model's own implementation)"
        )
    if fms.auto_gptq is not None:
        kernel = (fms.auto_gptq or ["triton_v2"])[0]
        if kernel != "triton_v2":
            raise UserError(f"--auto_gptq {kernel}: fms-hf-tuning supports only the triton_v2 kernel")
        if importlib.util.find_spec("gptqmodel") is None:
            raise UserError(
                "--auto_gptq trains LoRA on a GPTQ checkpoint, which transformers loads through gptqmodel "
                "(transformers 5 no longer uses auto-gptq): pip install gptqmodel optimum (gptqmodel pins its own torch; "
                "use a separate environment), or train this model with --quantization_method bnb_4bit"
            )
        if peft_method not in ("lora", "alora"):
            raise UserError("--auto_gptq (GPTQ-LoRA) trains LoRA adapters: add --peft_method lora")
        logger.info("--auto_gptq: the GPTQ checkpoint is loaded by transformers through gptqmodel")


def _fast_kernels(values: list[str], train: Any) -> None:
    if len(values) != 3:
        raise UserError(
            f"--fast_kernels takes FAST_LOSS FAST_RMS_LAYERNORM FAST_ROPE_EMBEDDINGS (3 values), got {values}"
        )
    fast_loss, rms, rope = (_true([v]) for v in values)
    if fast_loss:
        logger.info("--fast_kernels: the fast loss is the label-only chunked loss (no full logits)")
    if not (rms or rope):
        return
    import torch  # noqa: PLC0415 - the device decides, asked only when a kernel was requested

    missing = importlib.util.find_spec("liger_kernel") is None
    if missing or not torch.cuda.is_available():
        why = "liger-kernel is not installed (pip install 'tuning[liger]')" if missing else "no CUDA GPU here"
        logger.warning(
            "--fast_kernels: RMSNorm/RoPE kernels (Liger) can't run: %s; training without them", why
        )
        return
    train.use_liger_kernel = True
    # the loss stays ours (label-only, exact); Liger swaps only the layers asked for
    train.liger_kernel_config = {
        "rms_norm": rms,
        "rope": rope,
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,
    }
