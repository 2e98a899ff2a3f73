"""gpt-oss / MXFP4: the checkpoint layout, dequantized loading, flags, attention fallback, and full and
LoRA runs on a tiny gpt-oss whose expert weights are written as real MXFP4 ``*_blocks`` + ``*_scales``.
"""

from __future__ import annotations

import json
import logging
import re
import shlex

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Mxfp4Config

from tests.conftest import run_keeping_model, text_rows, write_json
from tuning import sft_trainer
from tuning.config import parse_config
from tuning.config.args import DataArgs, ModelArgs, QuantArgs
from tuning.data.chat import ChatSettings
from tuning.errors import UserError
from tuning.model import load_model, load_model_config, load_tokenizer, precision_plan, quantization
from tuning.model.loading import (
    _load_failure,
    attention_candidates,
    causal_lm_class,
    drop_stale_quantization_config,
)
from tuning.model.peft import apply_peft, wrapped_summary
from tuning.model.quantization import quantization_config
from tuning.testing.tiny_gpt_oss import pack_mxfp4, unpack_mxfp4, write_tiny_gpt_oss
from tuning.train.loss import label_only_loss, resolve_loss_implementation

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
EXPERTS = [f"model.layers.{i}.mlp.experts.{w}" for i in (0, 1) for w in ("gate_up_proj", "down_proj")]
SINK_KERNELS = (
    "kernels-community/vllm-flash-attn3, flash_attention_4, kernels-community/metal-flash-sdpa, "
    "kernels-community/aiter-flash-attn"
)


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory):
    """Tiny gpt-oss, MXFP4 experts; expert 0, output 0, inputs 0 and 1 of layer 0's gate_up hold -3.0 and
    0.5 (byte 0x2F: codes 0xF = -6 low, 0x2 = 1 high; scale 126 = 2^-1)."""
    out = write_tiny_gpt_oss(tmp_path_factory.mktemp("tiny-gpt-oss"))
    tensors = load_file(out / "model.safetensors")
    tensors[f"{GATE_UP}_blocks"][0, 0, 0, 0] = 0x2F
    tensors[f"{GATE_UP}_scales"][0, 0, 0] = 126
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def load(path, dtype="float32", peft_method="none", method="none", **model_flags):
    args = ModelArgs(model_name_or_path=str(path), torch_dtype=dtype, **model_flags)
    config = load_model_config(args)
    quant = quantization_config(QuantArgs(quantization_method=method), config, peft_method)
    plan = precision_plan(args, config, peft_method)
    return load_model(args, plan, load_tokenizer(args, DataArgs()), quant)


# --- layout and loading (fast) ---


def test_pack_mxfp4_writes_the_checkpoint_layout():
    weight = torch.zeros(1, 64, 1)  # [experts, in, out]: two blocks of 32 inputs
    weight[0, :4, 0] = torch.tensor([-3.0, 0.5, 1.5, 0.0])
    weight[0, 32:34, 0] = torch.tensor([6.0, -4.0])
    blocks, scales = pack_mxfp4(weight)
    assert blocks.shape == (1, 1, 2, 16) and blocks.dtype == torch.uint8
    assert blocks[0, 0, 0, :2].tolist() == [0x2F, 0x05]  # (-6, 1) and (3, 0) in units of 2^-1
    assert blocks[0, 0, 1, 0].item() == 0xE7  # 6 = code 7 low, -4 = code 0xE high, scale 2^0
    assert scales.tolist() == [[[126, 127]]]
    assert torch.equal(unpack_mxfp4(blocks, scales), weight)


def test_dequantized_load_gives_exactly_the_mxfp4_values(gpt_oss_dir):
    files = load_file(gpt_oss_dir / "model.safetensors")
    assert not any(name in files for name in EXPERTS)  # only blocks + scales on disk
    for dtype in ("float32", "bfloat16"):
        model = load(
            gpt_oss_dir, dtype, peft_method="lora" if dtype == "bfloat16" else "none", method="mxfp4"
        )
        params = dict(model.named_parameters())
        for name in EXPERTS:
            expected = unpack_mxfp4(files[f"{name}_blocks"], files[f"{name}_scales"])
            assert params[name].dtype == getattr(torch, dtype)
            assert torch.equal(params[name].float(), expected), name
        assert params[GATE_UP][0, :2, 0].tolist() == [-3.0, 0.5]
        assert getattr(model.config, "quantization_config", None) is None and not model.is_quantized


def test_quantization_flags(gpt_oss_dir, tiny_model_dir):
    mxfp4 = load_model_config(ModelArgs(model_name_or_path=str(gpt_oss_dir)))
    llama = load_model_config(ModelArgs(model_name_or_path=str(tiny_model_dir)))
    assert quantization_config(QuantArgs(), llama) is None
    # an MXFP4 checkpoint is dequantized even without the flag (kept MXFP4 it could not train here)
    assert quantization_config(QuantArgs(), mxfp4).to_dict() == Mxfp4Config(dequantize=True).to_dict()
    assert quantization_config(QuantArgs(), mxfp4).dequantize is True
    with pytest.raises(
        UserError,
        match=r"is not an MXFP4 checkpoint \(its config.json declares quantization none\); drop the",
    ):
        quantization_config(QuantArgs(quantization_method="mxfp4"), llama)
    if not torch.cuda.is_available():
        with pytest.raises(UserError) as e:
            quantization_config(QuantArgs(quantization_method="mxfp4", dequantize=False), mxfp4, "lora")
        assert str(e.value) == (
            "--dequantize False keeps MXFP4 weights, which needs a Hopper-class GPU; none is available; "
            "pass --dequantize True to train on weights expanded to --torch_dtype"
        )


@pytest.mark.parametrize(
    ("capability", "peft_method", "message"),
    [
        ((8, 0), "lora", "trains only on Hopper-class GPUs (compute capability 9.0+); A100 has 8.0"),
        ((9, 0), "none", "MXFP4 weights are frozen and can't receive updates; train an adapter"),
        ((9, 0), "lora", "needs the kernels and triton package(s)"),
    ],
)
def test_keeping_mxfp4_is_refused_where_it_cant_train(monkeypatch, capability, peft_method, message):
    # a simulated GPU: the decision reads only these three facts about the device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "A100")
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=re.escape(message)) as e:
        quantization.check_mxfp4_training(peft_method)
    assert str(e.value).endswith("pass --dequantize True to train on weights expanded to --torch_dtype")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_dequantize_false_on_cpu_exits_1_before_reading_data(gpt_oss_dir, tmp_path, capsys):
    (tmp_path / "missing.json").write_text(
        ""
    )  # empty: reading it would fail, so this error proves the data was never read
    argv = ["--model_name_or_path", str(gpt_oss_dir), "--training_data_path", str(tmp_path / "missing.json")]
    argv += ["--output_dir", str(tmp_path / "out"), "--quantization_method", "mxfp4", "--dequantize", "False"]
    assert sft_trainer.main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --dequantize False keeps MXFP4 weights, which needs a Hopper-class GPU; none is available; "
        "pass --dequantize True to train on weights expanded to --torch_dtype"
    )


def test_transformers_does_not_train_mxfp4_weights_yet():
    assert quantization._transformers_trains_mxfp4() is False  # transformers 5.24: is_trainable=False


def test_a_stale_quantization_config_is_dropped(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.quantization_config = {"quant_method": "mxfp4"}
    drop_stale_quantization_config(model)
    assert "quantization_config" not in model.config.to_dict()


def test_seed_gpt_oss_command_parses(tmp_path):
    data_config = tmp_path / "data_config.yaml"
    data_config.write_text(
        "datasets:\n  - name: thinking\n    data_paths: [train.jsonl]\n    data_handlers:\n"
        "      - name: tokenize_and_apply_chat_template_with_masking\n"
        "        arguments: {conversation_column_name: messages}\n",
        encoding="utf-8",
    )
    command = f"""--model_name_or_path "openai/gpt-oss-120b" --output_dir {tmp_path}/out
      --gradient_accumulation_steps 1 --per_device_train_batch_size 2 --num_train_epochs 1
      --torch_dtype bfloat16 --learning_rate 2e-4 --warmup_ratio 0.03 --lr_scheduler_type "cosine_with_min_lr"
      --lr_scheduler_kwargs '{{"min_lr_rate": 0.1}}' --max_seq_length 4096 --logging_steps 1
      --data_config {data_config} --gradient_checkpointing True --peft_method lora --lora_r 8
      --lora_alpha 16 --lora_dropout 0.0 --target_modules "all-linear" --quantization_method mxfp4
      --dequantize True --use_flash_attn True --tracker aim --aim_repo {tmp_path}/aimrepo
      --experiment "gpt-oss-120b-lora-tuning-fa3-attn-torch-2.8"
      --flash_attn_implementation="kernels-community/vllm-flash-attn3\""""
    config = parse_config(shlex.split(command))
    assert (config.quant.quantization_method, config.quant.dequantize) == ("mxfp4", True)
    assert config.model.flash_attn_implementation == "kernels-community/vllm-flash-attn3"
    assert config.data.data_config_path == str(data_config)
    assert (config.peft.peft_method, config.peft.lora_r, config.peft.target_modules) == (
        "lora",
        8,
        ["all-linear"],
    )
    assert config.trackers.trackers == ["file_logger", "aim"]
    assert config.trackers.experiment == "gpt-oss-120b-lora-tuning-fa3-attn-torch-2.8"
    assert config.train.lr_scheduler_kwargs == {"min_lr_rate": 0.1} and config.train.gradient_checkpointing


# --- attention fallback (fast) ---


def test_attention_chain_respects_the_sinks(gpt_oss_dir, tiny_model_dir):
    gpt_oss = causal_lm_class(load_model_config(ModelArgs(model_name_or_path=str(gpt_oss_dir))))
    llama = causal_lm_class(load_model_config(ModelArgs(model_name_or_path=str(tiny_model_dir))))
    hub = ModelArgs(flash_attn_implementation="kernels-community/vllm-flash-attn3")
    assert attention_candidates(hub, llama) == [
        "kernels-community/vllm-flash-attn3",
        "flash_attention_2",
        "sdpa",
        "eager",
    ]
    # asking gpt-oss for flash_attention_2 tries the sink-aware kernel the model names first
    assert attention_candidates(ModelArgs(), gpt_oss) == [
        "flash_attention_2",
        "kernels-community/vllm-flash-attn3",
        "sdpa",
        "eager",
    ]
    assert attention_candidates(ModelArgs(use_flash_attn=False), gpt_oss) == ["sdpa", "eager"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_unavailable_kernel_falls_back_with_one_warning(gpt_oss_dir, tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="tuning"):
        model = load(gpt_oss_dir, flash_attn_implementation="kernels-community/not-a-kernel")
        llama = load(tiny_model_dir, flash_attn_implementation="kernels-community/vllm-flash-attn3")
    assert (model.config._attn_implementation, llama.config._attn_implementation) == ("eager", "sdpa")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "attention: asked for kernels-community/not-a-kernel, using eager (kernels-community/not-a-kernel: "
        f"GptOssForCausalLM runs flash attention only with {SINK_KERNELS} (attention sinks); "
        "kernels-community/vllm-flash-attn3: no CUDA GPU is available; "
        f"flash_attention_2: GptOssForCausalLM runs flash attention only with {SINK_KERNELS} (attention "
        "sinks); sdpa: GptOssForCausalLM does not support sdpa)",
        "attention: asked for kernels-community/vllm-flash-attn3, using sdpa (kernels-community/"
        "vllm-flash-attn3: no CUDA GPU is available; flash_attention_2: no CUDA GPU is available)",
    ]


def test_a_kernel_that_fails_to_load_is_a_fallback_not_an_error():
    args = ModelArgs(model_name_or_path="m")
    offline = OSError("We couldn't connect to 'https://huggingface.co' to load kernels-community/x")
    assert _load_failure(args, "kernels-community/x", offline).startswith("We couldn't connect")
    with pytest.raises(UserError, match="cannot load model weights from m: disk"):
        _load_failure(args, "eager", OSError("disk"))


# --- MoE: router aux loss, what LoRA wraps (fast) ---


def test_router_aux_loss_is_the_models_own(gpt_oss_dir):
    model = load(gpt_oss_dir)
    ids = torch.tensor([[1, 55, 72, 69, 82, 4, 102, 4, 48]])
    train_args = type("Args", (), {"use_liger_kernel": False})()
    assert model.config.output_router_logits is False  # as shipped: the aux loss is off, label_only applies
    assert resolve_loss_implementation("auto", model, train_args).loss == "label_only"
    plain = model(input_ids=ids, labels=ids).loss
    model.config.output_router_logits = True
    out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None
    assert torch.allclose(out.loss, plain + 0.9 * out.aux_loss)  # router_aux_loss_coef from config.json
    # the label-only loss adds the same term (tests/test_loss.py checks it against the model's own loss)
    assert resolve_loss_implementation("auto", model, train_args).loss == "label_only"
    ours, _ = label_only_loss(model, {"input_ids": ids, "labels": ids})
    assert torch.allclose(ours, out.loss, rtol=1e-5, atol=1e-6)


def test_all_linear_leaves_router_and_experts_alone(gpt_oss_dir):
    from tuning.config.args import PeftArgs

    model = load(gpt_oss_dir, "bfloat16", "lora")
    plan = precision_plan(ModelArgs(model_name_or_path=str(gpt_oss_dir)), model.config, "lora")
    tokenizer = load_tokenizer(ModelArgs(model_name_or_path=str(gpt_oss_dir)), DataArgs())
    peft = apply_peft(PeftArgs(peft_method="lora", target_modules=["all-linear"]), model, tokenizer, plan)
    assert wrapped_summary(peft) == "8 modules (k_proj, o_proj, q_proj, v_proj)"
    frozen = [n for n, p in peft.named_parameters() if ("router" in n or "experts" in n) and p.requires_grad]
    assert frozen == []


# --- runs (slow) ---


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("mxfp4-data") / "train.json", text_rows(1))


def train(tmp_path, gpt_oss_dir, data_file, monkeypatch, *extra):
    out = tmp_path / "out"
    argv = [
        *("--model_name_or_path", str(gpt_oss_dir), "--training_data_path", str(data_file)),
        *("--output_dir", str(out), "--save_model_dir", str(out / "final"), "--save_strategy", "no"),
        *("--dataset_text_field", "output", "--response_template", "\\n### Label:"),
        *("--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"),
        *("--quantization_method", "mxfp4", "--dequantize", "True", "--logging_steps", "1"),
        *extra,
    ]
    code, model = run_keeping_model(monkeypatch, argv)
    assert code == 0
    return out / "final", model


@pytest.mark.slow
def test_full_fine_tuning_saves_a_plain_model(tmp_path, gpt_oss_dir, data_file, monkeypatch):
    final, model = train(tmp_path, gpt_oss_dir, data_file, monkeypatch, "--torch_dtype", "float32")
    config = json.loads((final / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "gpt_oss"
    saved = load_file(final / "model.safetensors")
    assert not any(k.endswith(("_blocks", "_scales")) for k in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert getattr(reloaded, "hf_quantizer", None) is None and not getattr(reloaded, "is_quantized", False)
    original = load(gpt_oss_dir)
    assert not torch.equal(
        reloaded.get_parameter(GATE_UP), original.get_parameter(GATE_UP)
    )  # experts trained
    assert torch.equal(reloaded.get_parameter(GATE_UP), model.get_parameter(GATE_UP))


@pytest.mark.slow
def test_lora_adapter_loads_onto_the_dequantized_model(tmp_path, gpt_oss_dir, data_file, monkeypatch):
    final, model = train(
        tmp_path,
        gpt_oss_dir,
        data_file,
        monkeypatch,
        *("--peft_method", "lora", "--target_modules", "all-linear", "--lora_dropout", "0.0"),
        *("--lora_alpha", "16", "--torch_dtype", "bfloat16", "--gradient_checkpointing", "True"),
    )
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    ids = torch.tensor([[1, 55, 72, 69, 82, 4, 102, 4, 48]])
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits.float()
    base = AutoModelForCausalLM.from_pretrained(
        gpt_oss_dir, dtype=torch.bfloat16, quantization_config=Mxfp4Config(dequantize=True)
    )
    with torch.no_grad():
        untrained = base(input_ids=ids).logits.float()
    reloaded = PeftModel.from_pretrained(base, final).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits.float(), trained, atol=1e-6)
    assert not torch.allclose(untrained, trained, atol=1e-2)  # the adapter learned something


# --- chat data: the harmony template's channels (fast) ---

# The assistant logic of gpt-oss's harmony chat template, reduced (no system/developer header, no tools):
# the last assistant turn renders its reasoning on the analysis channel, then the final channel, and ends
# in <|return|>; earlier turns drop their reasoning and end in <|end|>.
HARMONY = (
    "{%- for m in messages -%}{%- if m.role == 'assistant' -%}{%- if loop.last and not add_generation_prompt -%}"
    "{%- if m.thinking -%}{{ '<|start|>assistant<|channel|>analysis<|message|>' + m.thinking + '<|end|>' }}"
    "{%- endif -%}{{ '<|start|>assistant<|channel|>final<|message|>' + m.content + '<|return|>' }}"
    "{%- else -%}{{ '<|start|>assistant<|channel|>final<|message|>' + m.content + '<|end|>' }}{%- endif -%}"
    "{%- else -%}{{ '<|start|>' + m.role + '<|message|>' + m.content + '<|end|>' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
)


def test_harmony_chat_trains_the_analysis_and_final_channels(tokenizer):
    from tuning.data.handlers.chat import tokenize_and_apply_chat_template_with_masking

    batch = {
        "messages": [
            [{"role": "user", "content": "2+2?"}, {"role": "assistant", "thinking": "add", "content": "4"}]
        ]
    }
    out = tokenize_and_apply_chat_template_with_masking(
        batch, tokenizer=tokenizer, chat_template=HARMONY, chat_settings=ChatSettings(())
    )
    trained = [t for t, label in zip(out["input_ids"][0], out["labels"][0], strict=True) if label != -100]
    assert tokenizer.decode(trained) == (
        "<|channel|>analysis<|message|>add<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"
    )


def test_harmony_multi_turn_trains_every_turn_as_the_last_one(tokenizer):
    """Earlier assistant turns lose their analysis and end <|end|> once a later turn follows, but at
    inference each turn is generated as the last one (analysis, final, <|return|>): every turn gets a
    sample of its own, its context the conversation before it as the template renders it then."""
    from tuning.data.handlers.chat import tokenize_and_apply_chat_template_with_masking

    turn = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "thinking": "add", "content": "4"}]
    out = tokenize_and_apply_chat_template_with_masking(
        {"messages": [turn * 2]}, tokenizer=tokenizer, chat_template=HARMONY, chat_settings=ChatSettings(())
    )
    completion = (
        "<|channel|>analysis<|message|>add<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"
    )
    user = "<|start|>user<|message|>2+2?<|end|>"
    contexts = [user + "<|start|>assistant", user + "<|start|>assistant<|channel|>final<|message|>4<|end|>"]
    contexts[1] += contexts[0]
    assert out["chat_sample"] == [[0, 2, 0], [1, 2, 0]]
    for ids, labels, context in zip(out["input_ids"], out["labels"], contexts, strict=True):
        n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        assert tokenizer.decode(ids[:n]) == context and set(labels[:n]) == {-100}
        assert tokenizer.decode(ids[n:]) == completion and labels[n:] == ids[n:]
