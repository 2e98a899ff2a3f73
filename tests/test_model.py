"""Model stage: precision plan, attention fallback, vocabulary left alone."""

from __future__ import annotations

import logging

import pytest
import torch

from tuning.config.args import DataArgs, ModelArgs
from tuning.errors import UserError
from tuning.model import load_model, load_model_config, load_tokenizer, precision_plan
from tuning.model.loading import attention_candidates, why_unusable


@pytest.mark.parametrize(
    ("dtype", "master", "peft", "optim", "load", "autocast", "resolved"),
    [
        # full fine-tuning in bf16: Kahan-compensated bf16 by default, float32 masters + autocast on request
        ("bfloat16", "auto", "none", "adamw_torch", torch.bfloat16, None, "kahan"),
        ("bfloat16", "auto", "none", "adamw_torch_fused", torch.bfloat16, None, "kahan"),
        ("bfloat16", "float32", "none", "adamw_torch", torch.float32, torch.bfloat16, "float32"),
        ("bfloat16", "half", "none", "adamw_torch", torch.bfloat16, None, "half"),
        # another optimizer keeps its own precision: float32 masters, as before
        ("bfloat16", "auto", "none", "adamw_bnb_8bit", torch.float32, torch.bfloat16, "float32"),
        # adapters: frozen base in bf16, float32 adapter weights under autocast
        ("bfloat16", "auto", "lora", "adamw_torch", torch.bfloat16, torch.bfloat16, "float32"),
        ("bfloat16", "kahan", "lora", "adamw_torch", torch.bfloat16, None, "kahan"),
        ("float32", "auto", "none", "adamw_torch", torch.float32, None, "float32"),
        (
            "auto",
            "auto",
            "none",
            "adamw_torch",
            torch.float32,
            None,
            "float32",
        ),  # the tiny checkpoint is float32
    ],
)
def test_precision_plan(tiny_model_dir, dtype, master, peft, optim, load, autocast, resolved):
    args = ModelArgs(model_name_or_path=str(tiny_model_dir), torch_dtype=dtype, master_weights=master)
    plan = precision_plan(args, load_model_config(args), peft, optim)
    assert (plan.load_dtype, plan.autocast, plan.master_weights) == (load, autocast, resolved)
    assert plan.save_dtype == (torch.float32 if dtype in ("float32", "auto") else torch.bfloat16)


def test_half_precision_master_weights_is_master_weights_half(tiny_model_dir):
    assert ModelArgs(half_precision_master_weights=True).master_weights == "half"
    with pytest.raises(ValueError, match="means --master_weights half, but --master_weights is kahan"):
        ModelArgs(half_precision_master_weights=True, master_weights="kahan")
    args = ModelArgs(model_name_or_path=str(tiny_model_dir), torch_dtype="auto", master_weights="kahan")
    with pytest.raises(UserError, match="keeps bfloat16 weights, but the weights are float32"):
        precision_plan(args, load_model_config(args))


def test_attention_candidates_fall_back_to_sdpa_then_eager():
    assert attention_candidates(ModelArgs()) == ["flash_attention_2", "sdpa", "eager"]
    assert attention_candidates(ModelArgs(use_flash_attn=False)) == ["sdpa", "eager"]
    assert attention_candidates(ModelArgs(flash_attn_implementation="kernels-community/vllm-flash-attn3"))[
        0
    ] == ("kernels-community/vllm-flash-attn3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_flash_attention_falls_back_quietly_without_a_gpu(tiny_model_dir, caplog):
    args = ModelArgs(model_name_or_path=str(tiny_model_dir), torch_dtype="float32")
    tokenizer = load_tokenizer(args, DataArgs())
    assert why_unusable("flash_attention_2") == "no CUDA GPU is available"
    with caplog.at_level(logging.DEBUG, logger="tuning"):
        model = load_model(args, precision_plan(args, load_model_config(args)), tokenizer)
    assert model.config._attn_implementation == "sdpa"
    # the default asks for flash attention (as fms-hf-tuning does): on a CPU machine that is no news
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:")] == [
        "attention: asked for flash_attention_2, using sdpa (flash_attention_2: no CUDA GPU is available)"
    ]
    assert model.config.use_cache is False


def test_no_pad_token_is_added(tiny_model_dir):
    args = ModelArgs(model_name_or_path=str(tiny_model_dir), torch_dtype="float32")
    tokenizer = load_tokenizer(args, DataArgs())
    model = load_model(args, precision_plan(args, load_model_config(args)), tokenizer)
    assert tokenizer.pad_token is None
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 362


def test_added_special_tokens_resize_embeddings(tiny_model_dir):
    args = ModelArgs(model_name_or_path=str(tiny_model_dir), torch_dtype="float32")
    tokenizer = load_tokenizer(args, DataArgs(add_special_tokens=["<|tool|>", "</s>"]))
    model = load_model(args, precision_plan(args, load_model_config(args)), tokenizer)
    assert len(tokenizer) == 363  # only the new one; </s> already exists
    assert model.get_input_embeddings().weight.shape[0] == 363
    assert tokenizer("<|tool|>", add_special_tokens=False).input_ids == [362]
