"""Quantized checkpoints: turn ``--quantization_method`` / ``--dequantize`` into the quantization config
transformers loads with, and refuse the combinations that can't train here, before any weight is read.

transformers does the work (``Mxfp4Config``: its loader unpacks the ``*_blocks`` / ``*_scales``
tensors to the parameter dtype). What it doesn't do is say no early: on a GPU without MXFP4 training
support it silently dequantizes, or loads MXFP4 weights the Trainer then refuses. See docs/gpt-oss.md.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from transformers import Mxfp4Config, PretrainedConfig

from tuning.config import QuantArgs
from tuning.errors import UserError

logger = logging.getLogger(__name__)

# MXFP4 weights train (through an adapter) only with the triton MoE kernels, built for Hopper (sm_90) and newer.
HOPPER = (9, 0)


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


def quantization_config(args: QuantArgs, config: PretrainedConfig, peft_method: str = "none") -> Any:
    """The config to pass to ``from_pretrained`` (None: the checkpoint isn't quantized)."""
    declared = checkpoint_quant_method(config)
    name = getattr(config, "_name_or_path", "") or "the model"
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
