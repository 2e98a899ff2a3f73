"""The memory plan: activation counts against the tensors a real layer saves, parameter and byte counts
against published sizes and a loaded bitsandbytes model, the FSDP share, the fit check with the flags
that would fit, and ``tuning plan`` end to end. Measured-vs-planned peaks: benchmarks/RESULTS.md."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from tests.conftest import REPO, text_rows, write_json
from tuning import plan as plan_command
from tuning import sft_trainer
from tuning.config.args import ModelArgs, PeftArgs, QuantArgs
from tuning.errors import UserError
from tuning.model import memory_check, precision_plan
from tuning.model.memory import (
    Setup,
    Topology,
    Workload,
    adapter_activation_bytes,
    bnb_bytes,
    estimate,
    layer_activation_bytes,
    meta_model,
)
from tuning.model.memory_check import Capacity, check_fits, parse_size

CONFIGS = REPO / "benchmarks" / "model_configs"
GiB = 2**30
LLAMA2_7B_PARAMETERS = 6_738_415_616  # meta-llama/Llama-2-7b-hf
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def setup(name_or_config, peft="none", quant="none", master="auto", gpu=True, topology=None, **workload):
    config = (
        AutoConfig.from_pretrained(CONFIGS / name_or_config)
        if isinstance(name_or_config, str)
        else name_or_config
    )
    model = ModelArgs(model_name_or_path="m", master_weights=master)
    peft_args = PeftArgs(
        peft_method=peft, target_modules=["all-linear"] if peft != "none" else None, lora_r=16
    )
    quant_args = QuantArgs(quantization_method=quant)
    work = Workload(**{"batch_size": 1, "seq_len": 4096, **workload})
    precision = precision_plan(model, config, peft, work.optim)
    return Setup(config, model, peft_args, quant_args, precision, work, topology or Topology(), gpu=gpu)


# --- activations: the formula against what autograd saves in a real decoder layer (fast) ---

SMALL = dict(
    hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=100
)
TOKENS = 24  # no weight has a dimension of 24: saved tensors of that length are activations


def saved_bytes_per_token(regime: str, dropout: float | None = None) -> float:
    """Bytes of distinct storages one decoder layer saves for backward, per token."""
    config = LlamaConfig(**SMALL, num_hidden_layers=1, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if regime != "float32" and regime != "float32 masters":
        model = model.to(torch.bfloat16)
    if dropout is not None:  # an adapter run: frozen bf16 base, float32 adapters under autocast
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        model = model.get_base_model()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 100, (1, TOKENS))
    autocast = regime in ("float32 masters", "adapter")
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        hidden = model.model.embed_tokens(ids).detach().requires_grad_()
        position = torch.arange(TOKENS)[None]
        cos_sin = model.model.rotary_emb(hidden, position)
        shared = params | {t.untyped_storage().data_ptr() for t in cos_sin}  # computed once per model
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in shared and TOKENS in t.shape:  # not a weight or an autocast copy
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model.layers[0](
                hidden, position_embeddings=cos_sin, attention_mask=None, position_ids=position
            )
    return sum(seen.values()) / TOKENS


@pytest.mark.parametrize(
    ("regime", "compute", "residual"),
    [("bfloat16", 2, 2), ("float32 masters", 2, 4), ("float32", 4, 4)],
)
def test_full_fine_tuning_activations_are_what_a_layer_saves(regime, compute, residual):
    config = LlamaConfig(**SMALL, num_hidden_layers=1)
    assert layer_activation_bytes(config, 1, compute, residual) == saved_bytes_per_token(regime)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_adapter_activations_are_what_a_layer_saves(dropout):
    config = LlamaConfig(**SMALL, num_hidden_layers=1)
    plan = setup(config, peft="lora", gpu=False, seq_len=1)
    plan = replace(plan, peft=replace(plan.peft, lora_r=4, lora_dropout=dropout))
    model, _ = meta_model(plan)
    expected = layer_activation_bytes(config, 1, 2, 2, frozen=True) + adapter_activation_bytes(model, plan)
    assert expected == saved_bytes_per_token("adapter", dropout)


# --- parameters and bytes (fast) ---


def test_llama2_7b_bytes_per_parameter_in_each_mode():
    n = LLAMA2_7B_PARAMETERS
    for master, (weights, grads, state) in {
        "kahan": (2, 2, 6),  # bf16 weights, bf16 gradients, two bf16 moments + a bf16 compensation buffer
        "float32": (4, 4, 8),
        "half": (2, 2, 4),
    }.items():
        plan = estimate(setup("llama-2-7b", master=master, gradient_checkpointing=True))
        assert plan.parameters == plan.trainable == n
        assert (plan.weights, plan.gradients, plan.optimizer) == (weights * n, grads * n, state * n), master
    # autocast keeps a bf16 copy of the float32 weights it casts: every linear weight (not the embedding)
    plain = estimate(setup("llama-2-7b", master="float32"))
    assert plain.autocast_copies == 2 * (n - 32000 * 4096 - 65 * 4096)


@pytest.mark.slow
def test_lora_and_qlora_counts_on_llama2_7b():
    lora = estimate(setup("llama-2-7b", peft="lora"))
    per_layer = 4 * 16 * (4096 + 4096) + 3 * 16 * (4096 + 11008)  # q k v o, gate up down
    assert lora.trainable == 32 * per_layer == 39_976_960
    assert lora.adapter == 4 * lora.trainable and lora.optimizer == 8 * lora.trainable  # float32 adapters
    assert lora.weights == 2 * LLAMA2_7B_PARAMETERS
    qlora = estimate(setup("llama-2-7b", peft="lora", quant="bnb_4bit"))
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    blocks_q, blocks_mlp = 4096 * 4096 // 64, 4096 * 11008 // 64
    constants = 32 * 4 * (blocks_q + 4 * math.ceil(blocks_q / 256) + 1092)
    constants += 32 * 3 * (blocks_mlp + 4 * math.ceil(blocks_mlp / 256) + 1092)
    unquantized = 2 * (2 * 32000 * 4096 + 65 * 4096)  # embeddings, head and norms stay bf16
    assert qlora.weights == linear // 2 + constants + unquantized  # 4.13 bits per quantized weight
    assert qlora.trainable == lora.trainable


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed: pip install 'tuning[bitsandbytes]'")
@pytest.mark.parametrize(
    "kwargs",
    [{"load_in_4bit": True}, {"load_in_4bit": True, "use_bnb_nested_quant": False}, {"load_in_8bit": True}],
)
def test_bitsandbytes_bytes_are_what_bitsandbytes_stores(tmp_path, kwargs):
    from transformers import AutoModelForCausalLM

    from tuning.model.quantization import quantization_config

    config = LlamaConfig(**{**SMALL, "hidden_size": 128, "intermediate_size": 256}, num_hidden_layers=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    quant = QuantArgs(**kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path,
        dtype=torch.bfloat16,
        device_map="cpu",
        quantization_config=quantization_config(quant, config, "lora"),
    )
    stored = 0
    for module in loaded.modules():
        for param in module.parameters(recurse=False):
            stored += param.numel() * param.element_size()
            state = getattr(param, "quant_state", None)
            if state is not None:  # absmax, code tables, nested absmax and its offset
                tensors = [*state.as_dict().values(), getattr(state, "offset", None)]
                stored += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
            if getattr(param, "SCB", None) is not None:
                stored += param.SCB.numel() * param.SCB.element_size()
    plan = replace(setup(config, peft="lora"), quant=quant)
    model, quantized = meta_model(plan)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert (
        sum(bnb_bytes(p.numel(), p.shape[0], quant) if id(p) in quantized else 2 * p.numel() for p in frozen)
        == stored
    )


def test_fsdp_shares_weights_gradients_and_state():
    one = estimate(setup("llama-2-7b", gradient_checkpointing=True))
    eight = estimate(setup("llama-2-7b", gradient_checkpointing=True, topology=Topology(8, sharded=True)))
    assert (eight.weights, eight.gradients, eight.optimizer) == (
        one.weights // 8,
        one.gradients // 8,
        one.optimizer // 8,
    )
    layer = 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096)  # one bf16 decoder layer: an FSDP unit
    root = 2 * (2 * 32000 * 4096 + 4096)  # embeddings, head, final norm: gathered through the pass
    assert eight.gathered == root + 2 * layer  # the current layer and the prefetched next
    assert eight.activations == one.activations  # each process runs its own micro-batch
    offloaded = estimate(setup("llama-2-7b", topology=Topology(8, sharded=True, offload=True)))
    assert offloaded.weights == offloaded.optimizer == offloaded.gradients == 0


def test_published_parameter_counts():
    assert estimate(setup("llama-3-70b")).parameters == 70_553_706_496  # meta-llama/Meta-Llama-3-70B
    assert round(estimate(setup("gpt-oss-120b")).parameters / 1e9, 2) == 116.83  # openai/gpt-oss-120b


# --- the fit check and what would fit (fast) ---


@pytest.mark.slow
def test_the_seed_example_fits_an_80gb_gpu_with_the_lean_default():
    """fms-hf-tuning's seed example 1: Llama-2-7B full fine-tuning, batch 4 x 4096 tokens, lr 1e-5."""
    capacity = Capacity(parse_size("80GiB") - memory_check.GPU_RUNTIME_RESERVE, "usable on an 80GiB GPU")
    seed = setup("llama-2-7b", batch_size=4, gradient_checkpointing=True)
    assert seed.precision.master_weights == "kahan"
    assert check_fits(estimate(seed), seed, capacity) is None
    float32 = setup("llama-2-7b", master="float32", batch_size=4, gradient_checkpointing=True)
    assert check_fits(estimate(float32), float32, capacity) == (
        f"the memory plan needs {memory_check.gib(estimate(float32).total)} per device, more than the 78.00 GiB usable on "
        f"an 80GiB GPU; would fit ({memory_check.gib(estimate(seed).total)}): --master_weights kahan"
    )


@pytest.mark.slow
def test_what_would_fit_is_the_least_change_that_fits():
    small = Capacity(parse_size("24GiB"), "usable on a 24GiB GPU")
    full = setup("llama-2-7b", batch_size=4)
    message = check_fits(estimate(full), full, small)
    assert message.endswith("--gradient_checkpointing True --peft_method lora")
    tiny = Capacity(parse_size("8GiB"), "usable on an 8GiB GPU")
    assert check_fits(estimate(full), full, tiny).endswith(
        "--gradient_checkpointing True --per_device_train_batch_size 1 (raise --gradient_accumulation_steps "
        "to keep the batch) --peft_method lora --quantization_method bnb_4bit"
    )
    nothing = Capacity(GiB, "usable on a 1GiB GPU")
    assert check_fits(estimate(full), full, nothing).endswith(
        "no single-device setting of these flags fits: shard it with FSDP over more GPUs (docs/distributed.md)"
    )


def test_parse_size():  # a GPU's label (80GB) and names: tests/test_plan_verdicts.py
    assert parse_size("80GiB") == parse_size("80g") == 80 * GiB
    assert parse_size("512 MiB") == 512 * 2**20
    with pytest.raises(UserError, match="--device_memory 'lots' is not a size"):
        parse_size("lots")


# --- the run and `tuning plan` (fast) ---


def test_a_run_that_cannot_fit_stops_before_the_data(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        memory_check, "device_capacity", lambda: Capacity(8 * 2**20, "of CPU RAM available (test)")
    )
    (tmp_path / "missing.json").write_text(
        ""
    )  # empty: reading it would fail, so this error proves the data was never read
    argv = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--training_data_path",
        str(tmp_path / "missing.json"),
    ]
    argv += ["--output_dir", str(tmp_path / "out"), "--use_flash_attn", "false"]  # 8 rows of 512 tokens
    assert sft_trainer.main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the memory plan needs 34.5 MiB per device, more than the 8.0 MiB of CPU RAM available (test); "
        "would fit (3.9 MiB): --per_device_train_batch_size 1 (raise --gradient_accumulation_steps to keep the "
        "batch); `tuning plan ARGS` prints the breakdown, --memory_check warn runs anyway"
    )


@pytest.mark.slow
def test_memory_check_warn_goes_on(tiny_model_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(
        memory_check, "device_capacity", lambda: Capacity(8 * 2**20, "of CPU RAM available (test)")
    )
    data = write_json(tmp_path / "train.json", text_rows(1))
    argv = ["--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(data), "--output_dir"]
    argv += [str(tmp_path / "out"), "--use_flash_attn", "false", "--dataset_text_field", "output"]
    argv += ["--memory_check", "warn", "--max_steps", "1", "--save_strategy", "no"]
    with caplog.at_level(logging.WARNING, logger="tuning"):
        assert sft_trainer.main(argv) == 0
    assert any(r.getMessage().startswith("the memory plan needs 34.5 MiB") for r in caplog.records)


def test_tuning_plan_prints_the_plan_without_training(capsys):
    args = ["--model_name_or_path", str(CONFIGS / "llama-2-7b"), "--device_memory", "80GiB"]
    args += ["--per_device_train_batch_size", "4", "--gradient_checkpointing", "True"]
    assert plan_command.main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "memory plan per device (full fine-tuning, bfloat16 weights, kahan master weights; estimated from the "
        "config, no weights read):\n"
    )
    assert "  weights            12.55 GiB  6.74B parameters as stored\n" in out
    assert "  optimizer state    37.65 GiB  Kahan AdamW: 2 moments + compensation, 6 B/param\n" in out
    assert out.rstrip().endswith("usable on a GPU with 80GiB (2.00 GiB kept for the CUDA runtime): fits")


@pytest.mark.slow
def test_tuning_plan_exits_1_naming_what_would_fit(capsys, tmp_path):
    accelerate = tmp_path / "fsdp.yaml"
    accelerate.write_text(
        "distributed_type: FSDP\nnum_processes: 16\nfsdp_config:\n  fsdp_activation_checkpointing: true\n"
    )
    args = ["--model_name_or_path", str(CONFIGS / "llama-3-70b"), "--device_memory", "80GiB"]
    args += ["--per_device_train_batch_size", "1"]
    assert plan_command.main(args) == 1
    captured = capsys.readouterr()
    assert "does NOT fit" in captured.out
    assert captured.err.strip().endswith("--peft_method lora --quantization_method bnb_4bit")
    assert plan_command.main([*args, "--accelerate_config", str(accelerate)]) == 0  # FSDP over 16 GPUs
    assert "FSDP share of 16 processes" in capsys.readouterr().out


@pytest.mark.slow
def test_activation_offloading_losses_equal_and_planned(tmp_path, tiny_model_dir):
    """--activation_offloading (torch's save_on_cpu) changes where saved tensors wait, not what is computed:
    with and without it, and composed with gradient checkpointing, the per-step losses are equal; the plan
    counts one layer's activations on the device."""
    import json

    from tests.conftest import text_rows, write_json
    from tuning import sft_trainer
    from tuning.config import parse_config
    from tuning.model import estimate, load_model_config, precision_plan, setup_for, topology_of

    data = write_json(tmp_path / "d.json", text_rows(1))
    losses = {}
    for name, extra in {
        "plain": [],
        "offloaded": ["--activation_offloading", "true"],
        "checkpointed": ["--gradient_checkpointing", "true"],
        "both": ["--gradient_checkpointing", "true", "--activation_offloading", "true"],
    }.items():
        out = tmp_path / name
        argv = ["--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(data)]
        argv += ["--output_dir", str(out), "--dataset_text_field", "output", "--torch_dtype", "float32"]
        argv += ["--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", "2"]
        argv += ["--save_strategy", "no", "--learning_rate", "1e-2", *extra]
        assert sft_trainer.main(argv) == 0
        lines = (out / "training_logs.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["data"]["value"] for line in lines]
        config = parse_config(argv)
        model_config = load_model_config(config.model)
        precision = precision_plan(config.model, model_config, "none", config.train.optim_name)
        losses[name + " plan"] = estimate(
            setup_for(config, model_config, precision, topology_of(1))
        ).activations
    assert len(losses["plain"]) == 3 and losses["plain"][-1] != losses["plain"][0]
    for name in ("offloaded", "checkpointed", "both"):
        assert losses[name] == pytest.approx(losses["plain"], abs=1e-6), name
    assert losses["offloaded plan"] < losses["checkpointed plan"] < losses["plain plan"]


# --- the plan's activation and logits terms against measured peak memory (RSS growth, CPU, float32) ---

MEASURED_TOLERANCE = 0.08  # docs/memory.md: plan / measured growth within 1 ± 0.08


@pytest.mark.slow
def test_activations_and_logits_are_within_the_stated_tolerance_of_measured_peak_memory():
    """Each shape's forward + backward in a fresh process: peak RSS growth over the resident memory just
    before the pass (weights and gradients already allocated), against the plan's two terms."""
    from tests.peak_memory import SHAPES, can_measure, measure_in_subprocess, planned

    reason = can_measure()
    if reason:
        pytest.skip(reason)
    measured = measure_in_subprocess(SHAPES)
    ratios = [planned(shape)["working"] / m["grown"] for shape, m in zip(SHAPES, measured, strict=True)]
    assert all(abs(r - 1) <= MEASURED_TOLERANCE for r in ratios), ratios
