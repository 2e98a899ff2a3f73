"""Quantized weights: turn ``--quantization_method`` into the quantization config transformers loads with,
and refuse the combinations that can't train here, before any weight is read.

Two kinds. **MXFP4 checkpoints** (gpt-oss): transformers' ``Mxfp4Config`` unpacks the ``*_blocks`` /
``*_scales`` tensors to the parameter dtype; what it doesn't do is say no early (on a GPU without MXFP4
training support it silently dequantizes, or loads MXFP4 weights the Trainer then refuses). See
docs/gpt-oss.md. **QLoRA** (``bnb_4bit`` / ``bnb_8bit``): bitsandbytes quantizes the frozen base while
transformers loads it (``BitsAndBytesConfig``) and LoRA adapters train on top; see docs/memory.md.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from transformers import BitsAndBytesConfig, Mxfp4Config, PretrainedConfig
from transformers.utils.import_utils import BITSANDBYTES_MIN_VERSION, is_bitsandbytes_available

from tuning.compat import transformers as hf
from tuning.config import BNB_METHODS, QuantArgs
from tuning.errors import UserError

logger = logging.getLogger(__name__)

# MXFP4 weights train (through an adapter) only with the triton MoE kernels, built for Hopper (sm_90) and newer.
HOPPER = (9, 0)
BNB_INSTALL_HINT = "pip install 'tuning[bitsandbytes]' (or: pip install bitsandbytes)"


def checkpoint_quant_method(config: PretrainedConfig) -> str | None:
    """The quantization the checkpoint's config.json declares (``mxfp4`` for openai/gpt-oss-*), or None."""
    declared = getattr(config, "quantization_config", None)
    if declared is None:
        return None
    method = (
        declared.get("quant_method")
        if isinstance(declared, dict)
        else getattr(declared, "quant_method", None)
    )
    return str(getattr(method, "value", method))


def quantization_config(
    args: QuantArgs,
    config: PretrainedConfig,
    peft_method: str = "none",
    compute_dtype: torch.dtype = torch.bfloat16,
    sharded: bool = False,
) -> Any:
    """The config to pass to ``from_pretrained`` (None: the weights load unquantized).

    ``compute_dtype``: what the dequantized bitsandbytes weights compute in (the plan's load dtype);
    ``sharded``: FSDP will shard the model, so packed 4-bit weights are stored in that dtype too.
    """
    declared = checkpoint_quant_method(config)
    name = hf.name_or_path(config) or "the model"
    if args.quantization_method in BNB_METHODS:
        return bnb_config(args, declared, name, compute_dtype, sharded)
    if args.quantization_method == "none" and declared != "mxfp4":
        return None
    if declared != "mxfp4":
        raise UserError(
            f"--quantization_method mxfp4: {name} is not an MXFP4 checkpoint (its config.json declares "
            f"quantization {declared or 'none'}); drop the flag, or point --model_name_or_path at an MXFP4 "
            "checkpoint such as openai/gpt-oss-20b"
        )
    if args.quantization_method == "none":
        logger.info("%s is an MXFP4 checkpoint: loading it as --quantization_method mxfp4", name)
    if not args.dequantize:
        check_mxfp4_training(peft_method)
    else:
        logger.info("mxfp4: dequantizing the expert weights on load")
    return Mxfp4Config(dequantize=args.dequantize)


def check_mxfp4_training(peft_method: str) -> None:
    """Raise a UserError unless MXFP4 weights can be kept and trained (through an adapter) here."""
    fix = "pass --dequantize True to train on weights expanded to --torch_dtype"
    if not torch.cuda.is_available():
        raise UserError(
            f"--dequantize False keeps MXFP4 weights, which needs a Hopper-class GPU; none is available; {fix}"
        )
    capability = torch.cuda.get_device_capability()
    if capability < HOPPER:
        gpu = torch.cuda.get_device_name()
        raise UserError(
            f"--dequantize False keeps MXFP4 weights, which trains only on Hopper-class GPUs (compute capability "
            f"9.0+); {gpu} has {capability[0]}.{capability[1]}; {fix}"
        )
    if peft_method == "none":
        raise UserError(
            "--dequantize False: MXFP4 weights are frozen and can't receive updates; train an adapter "
            f"(--peft_method lora) or {fix}"
        )
    missing = [p for p in ("kernels", "triton") if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(
            f"--dequantize False needs the {' and '.join(missing)} package(s); install them or {fix}"
        )
    if not _transformers_trains_mxfp4():
        import transformers

        raise UserError(
            f"--dequantize False: transformers {transformers.__version__} can load MXFP4 weights but not train "
            f"on them (its MXFP4 quantizer reports is_trainable=False); {fix}"
        )


def _transformers_trains_mxfp4() -> bool:
    from transformers.quantizers.quantizer_mxfp4 import Mxfp4HfQuantizer

    return bool(Mxfp4HfQuantizer(Mxfp4Config(dequantize=False)).is_trainable)


# --- QLoRA: bitsandbytes 4-bit / 8-bit base weights ---


def bnb_config(
    args: QuantArgs, declared: str | None, name: str, compute_dtype: torch.dtype, sharded: bool
) -> BitsAndBytesConfig:
    """``BitsAndBytesConfig`` for ``bnb_4bit`` / ``bnb_8bit``; exit 1 with an install line without bitsandbytes.

    Which modules stay unquantized is transformers' rule (the output head and tied weights), so the
    adapter's targets and the memory plan (tuning/model/memory.py) see the same model.
    """
    method = args.quantization_method
    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)  # this run uses it: its warnings count again
    if not is_bitsandbytes_available():  # transformers' check: installed, and at least its minimum version
        found = importlib.util.find_spec("bitsandbytes") is not None
        what = f"bitsandbytes {BITSANDBYTES_MIN_VERSION} or newer" if found else "the bitsandbytes package"
        raise UserError(f"--quantization_method {method} needs {what}: {BNB_INSTALL_HINT}")
    if declared not in (None, "bitsandbytes"):
        raise UserError(
            f"--quantization_method {method}: {name} is already quantized ({declared}); bitsandbytes quantizes "
            f"float weights; drop the flag (MXFP4 checkpoints: --quantization_method mxfp4)"
        )
    if method == "bnb_8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = args.bnb_4bit_quant_storage or (_dtype_name(compute_dtype) if sharded else "uint8")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=args.bnb_4bit_compute_dtype or _dtype_name(compute_dtype),
        bnb_4bit_quant_storage=storage,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_bnb(quantization: Any) -> bool:
    return isinstance(quantization, BitsAndBytesConfig)


def quantized_load_kwargs(quantization: Any) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments: bitsandbytes quantizes on the device the weights land on, so
    they load straight onto this process's device (its GPU under a multi-GPU launch, else the CPU)."""
    if not is_bnb(quantization):
        return {}
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return {"device_map": {"": device}}


def keep_training_layout(model: Any) -> None:
    """On CPU, keep bitsandbytes' 4-bit weights in the layout training uses.

    bitsandbytes 0.50 repacks a ``Linear4bit`` weight into a CPU inference layout the first time the layer
    runs in eval mode without gradients (on CPUs with AVX512-BF16). Training after that (the next step
    after an evaluation) runs through a kernel with no autograd support: torch warns and the gradients
    are wrong (measured: losses diverge from the run without evaluation at the step after it), and
    layers narrower than 32 outputs fail outright. The switch that enables the repack is per module;
    turning it off costs CPU inference speed only. (tests/test_qlora.py runs evaluation between steps.)
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_quantized_base(model: Any) -> None:
    """What an adapter on a bitsandbytes base needs: peft's ``prepare_model_for_kbit_training`` minus its
    upcast.

    peft's function (1) freezes every base parameter, (2) casts every float16/bfloat16 parameter that is not
    4-bit (embeddings, norms, output head) to float32, (3) makes the embedding output require grad and
    (4) turns on gradient checkpointing. We do (1) here, (3) in the adapter stage for every LoRA run, and
    leave (4) to ``--gradient_checkpointing`` (the memory plan says when it is needed). We skip (2): the
    frozen weights never receive updates, so float32 copies buy no precision, while they cost 2 more
    bytes per embedding/head parameter (4.2 GB on Llama-3-70B's 128k vocabulary) and make the residual
    stream float32, which grows every layer's activations; autocast computes in bfloat16 either way.
    fms-acceleration-peft drops the upcast for the same reason (throughput).
    """
    for param in model.parameters():
        param.requires_grad_(False)
