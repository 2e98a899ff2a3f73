"""QLoRA: one mode behind three spellings, LoRA only, NF4 + double quantization on the tiny Llama (trains,
the adapter reloads with plain peft on the float base, merges), and resume after kill -9.

bitsandbytes (the ``bitsandbytes`` extra, part of ``dev``) runs 4-bit NF4 on CPU; the tests that need it
skip with the install line when it is absent.
"""

from __future__ import annotations

import importlib.util
import json
import signal

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tests.conftest import run_keeping_model, text_rows, write_json
from tests.test_resume import assert_same_losses, complete_steps, fork_with_fault, losses
from tuning import merge, sft_trainer
from tuning.config import parse_config
from tuning.config.args import QuantArgs
from tuning.errors import UserError
from tuning.model import load_model_config, quantization
from tuning.model.quantization import keep_training_layout, quantization_config
from tuning.train import read_training_logs

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(
    not HAS_BNB, reason="bitsandbytes is not installed: pip install 'tuning[bitsandbytes]'"
)
COMMON = ["--model_name_or_path", "m", "--training_data_path", "d.json", "--output_dir", "o"]
PROMPT = torch.tensor([[1, 55, 72, 69, 82, 4, 102, 4, 48, 69, 70, 73, 80, 30, 4, 80, 83]])


# --- one mode, three spellings (fast) ---


@pytest.mark.parametrize(
    ("flags", "method", "quant_type"),
    [
        (["--quantization_method", "bnb_4bit"], "bnb_4bit", "nf4"),
        (["--load_in_4bit"], "bnb_4bit", "nf4"),  # TRL
        (["--load_in_4bit", "True", "--bnb_4bit_quant_type", "fp4"], "bnb_4bit", "fp4"),
        (["--bnb_qlora", "nf4"], "bnb_4bit", "nf4"),  # fms-hf-tuning's accelerated-peft plugin
        (["--bnb_qlora", "fp4", "False"], "bnb_4bit", "fp4"),
        (["--quantization_method", "bnb_4bit", "--load_in_4bit", "--bnb_qlora", "nf4"], "bnb_4bit", "nf4"),
        (["--load_in_8bit"], "bnb_8bit", "nf4"),
        (["--quantization_method", "bnb_8bit", "--load_in_8bit", "True"], "bnb_8bit", "nf4"),
    ],
)
def test_aliases_are_one_mode(flags, method, quant_type):
    quant = parse_config([*COMMON, "--peft_method", "lora", *flags]).quant
    assert (quant.quantization_method, quant.bnb_4bit_quant_type) == (method, quant_type)
    assert (quant.load_in_4bit, quant.load_in_8bit) == (method == "bnb_4bit", method == "bnb_8bit")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--load_in_4bit", "--load_in_8bit"],
            "--load_in_4bit (bnb_4bit), --load_in_8bit (bnb_8bit) name different quantization modes; pass one of them",
        ),
        (
            ["--quantization_method", "mxfp4", "--bnb_qlora", "nf4"],
            "--quantization_method (mxfp4), --bnb_qlora (bnb_4bit) name different quantization modes; pass one "
            "of them",
        ),
        (
            ["--bnb_qlora", "nf4", "--bnb_4bit_quant_type", "fp4"],
            "--bnb_4bit_quant_type (fp4), --bnb_qlora (nf4) name different 4-bit types; pass one of them",
        ),
        (["--bnb_qlora", "int4"], "--bnb_qlora takes QUANT_TYPE (nf4 or fp4) [NO_PEFT_MODEL], got int4"),
        (["--bnb_qlora", "nf4", "maybe"], "--bnb_qlora NO_PEFT_MODEL must be true or false, got maybe"),
    ],
)
def test_conflicting_aliases_exit_1(flags, message):
    with pytest.raises(UserError) as e:
        parse_config([*COMMON, "--peft_method", "lora", *flags])
    assert str(e.value) == f"invalid arguments: {message}"


def test_resolved_config_passes_back_unchanged(tmp_path):
    from tuning.config.parser import resolved_config_dict

    config = parse_config([*COMMON, "--peft_method", "lora", "--bnb_qlora", "fp4"])
    path = tmp_path / "resolved.json"
    path.write_text(json.dumps(resolved_config_dict(config), default=str))
    again = parse_config(["--config", str(path)]).quant
    assert again == config.quant


@pytest.mark.parametrize(
    ("peft", "what"), [([], "full fine-tuning"), (["--peft_method", "pt"], "--peft_method pt")]
)
def test_qlora_trains_lora_only(tmp_path, capsys, peft, what):
    argv = ["--model_name_or_path", "m", "--training_data_path", str(tmp_path / "missing.json")]
    argv += ["--output_dir", str(tmp_path / "out"), "--load_in_4bit", *peft]
    assert sft_trainer.main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --quantization_method bnb_4bit (QLoRA) keeps the base weights frozen in 4 bits and trains LoRA "
        f"adapters on them; {what} can't train that way: add --peft_method lora, or drop the quantization to "
        "train without it"
    )


def test_bitsandbytes_missing_is_one_install_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quantization, "is_bitsandbytes_available", lambda: False)
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    (tmp_path / "none.json").write_text(
        ""
    )  # empty: reading it would fail, so this error proves the data was never read
    argv = ["--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(tmp_path / "none.json")]
    argv += [
        "--output_dir",
        str(tmp_path / "out"),
        "--peft_method",
        "lora",
        "--quantization_method",
        "bnb_4bit",
    ]
    assert sft_trainer.main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --quantization_method bnb_4bit needs the bitsandbytes package: pip install "
        "'tuning[bitsandbytes]' (or: pip install bitsandbytes)"
    )


@needs_bnb
def test_bnb_config_follows_the_flags(tiny_model_dir):
    from tuning.config.args import ModelArgs

    config = load_model_config(ModelArgs(model_name_or_path=str(tiny_model_dir)))
    four = quantization_config(QuantArgs(load_in_4bit=True), config, "lora", torch.bfloat16)
    assert isinstance(four, BitsAndBytesConfig) and four.load_in_4bit and not four.load_in_8bit
    assert (four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant) == ("nf4", True)
    assert (four.bnb_4bit_compute_dtype, four.bnb_4bit_quant_storage) == (torch.bfloat16, torch.uint8)
    trl = QuantArgs(load_in_4bit=True, use_bnb_nested_quant=False, bnb_4bit_quant_type="fp4")
    four = quantization_config(trl, config, "lora", torch.float32)
    assert (four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant, four.bnb_4bit_compute_dtype) == (
        "fp4",
        False,
        torch.float32,
    )
    # under FSDP every parameter of a layer is sharded in one dtype: the packed weights are stored in it too
    sharded = quantization_config(QuantArgs(bnb_qlora=["nf4"]), config, "lora", torch.bfloat16, sharded=True)
    assert sharded.bnb_4bit_quant_storage == torch.bfloat16
    eight = quantization_config(QuantArgs(load_in_8bit=True), config, "lora")
    assert eight.load_in_8bit and not eight.load_in_4bit


def test_double_quant_alias():
    parsed = parse_config(
        [*COMMON, "--peft_method", "lora", "--load_in_4bit", "--bnb_4bit_use_double_quant", "False"]
    )
    assert parsed.quant.use_bnb_nested_quant is False
    assert (
        parse_config([*COMMON, "--peft_method", "lora", "--load_in_4bit"]).quant.use_bnb_nested_quant is True
    )


# --- runs on the tiny Llama (slow) ---


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("qlora-data") / "train.json", text_rows())


def qlora_argv(tiny_model_dir, data_file, out, *extra):
    return [
        *("--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(data_file)),
        *("--output_dir", str(out), "--save_model_dir", str(out / "final")),
        *("--dataset_text_field", "output", "--response_template", "\\n### Label:"),
        *("--num_train_epochs", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"),
        *("--use_flash_attn", "false", "--lora_dropout", "0.0", "--peft_method", "lora"),
        *("--target_modules", "all-linear", "--quantization_method", "bnb_4bit"),
        *("--bnb_4bit_quant_type", "nf4", "--use_bnb_nested_quant", "True", *extra),
    ]


def logits(model, ids=PROMPT) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@needs_bnb
@pytest.mark.slow
def test_qlora_nf4_trains_reloads_on_the_float_base_and_merges(
    tiny_model_dir, data_file, tmp_path, monkeypatch
):
    import bitsandbytes as bnb

    out = tmp_path / "out"
    code, model = run_keeping_model(monkeypatch, qlora_argv(tiny_model_dir, data_file, out))
    assert code == 0
    values = [r["value"] for r in read_training_logs(out)]
    assert values[0] > values[1] > values[2] and values[2] < 0.95 * values[0], values
    # it learns like LoRA on the float (bf16) base: the same job without quantization ends within 3%
    lora = qlora_argv(tiny_model_dir, data_file, tmp_path / "lora")[:-6] + ["--save_strategy", "no"]
    assert run_keeping_model(monkeypatch, lora)[0] == 0
    float_values = [r["value"] for r in read_training_logs(tmp_path / "lora")]
    assert abs(values[-1] - float_values[-1]) < 0.03 * float_values[-1], (values, float_values)

    # the base really is NF4 with double quantization, frozen; the adapters are float32 master weights
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    state = q_proj.base_layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    final = out / "final"
    saved = load_file(final / "adapter_model.safetensors")
    assert len(saved) == 28 and {v.dtype for v in saved.values()} == {torch.float32}  # 2 layers x 7 x A,B
    for checkpoint in out.glob("checkpoint-*"):  # adapter + trainer state, never (quantized) base weights
        assert not {"model.safetensors", "config.json"} & {p.name for p in checkpoint.iterdir()}

    # plain peft on the unquantized base: the trained adapter, up to the base's NF4 rounding
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    untrained = logits(base)
    nf4 = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir,
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True),
    )
    keep_training_layout(nf4)  # bitsandbytes' CPU inference repack fails on the tiny model's 16-wide layers
    reloaded = PeftModel.from_pretrained(base, final)
    on_float = logits(reloaded)
    # what the adapter adds is the same on the float base as on the NF4 base it was trained on
    on_float_delta, on_nf4_delta = (on_float - untrained).flatten(), (logits(model) - logits(nf4)).flatten()
    assert torch.nn.functional.cosine_similarity(on_float_delta, on_nf4_delta, dim=0) > 0.95  # measured 0.99
    assert abs(on_float_delta.norm() / on_nf4_delta.norm() - 1) < 0.1
    assert on_float_delta.norm() > 5 * (logits(nf4) - untrained).norm()  # far larger than NF4's rounding
    for name, value in reloaded.state_dict().items():
        if "lora_" in name:
            key = name.replace(".default", "")
            assert torch.equal(value, saved[key]), name

    # tuning merge folds it into the unquantized base: a plain model folder, same logits as base + adapter
    merged_dir = merge.merge(str(final), str(tmp_path / "merged"), dtype="float32")
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert not getattr(merged, "is_quantized", False)
    assert torch.allclose(logits(merged), on_float, atol=1e-5)


@needs_bnb
@pytest.mark.slow
def test_qlora_8bit_trains(tiny_model_dir, data_file, tmp_path, monkeypatch):
    argv = qlora_argv(tiny_model_dir, data_file, tmp_path / "out", "--save_strategy", "no")
    argv[argv.index("bnb_4bit")] = "bnb_8bit"
    code, model = run_keeping_model(monkeypatch, argv)
    assert code == 0
    values = [r["value"] for r in read_training_logs(tmp_path / "out")]
    assert values[-1] < values[0], values
    assert getattr(model.get_base_model(), "is_loaded_in_8bit", False)


@needs_bnb
@pytest.mark.slow
def test_qlora_resumes_after_kill_9_like_an_uninterrupted_run(tiny_model_dir, data_file, tmp_path):
    def argv(out):
        return qlora_argv(tiny_model_dir, data_file, out) + [
            *("--max_steps", "6", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"),
            *(
                "--save_strategy",
                "steps",
                "--save_steps",
                "2",
                "--logging_strategy",
                "steps",
                "--logging_steps",
                "1",
            ),
        ]

    reference = tmp_path / "reference"
    sft_trainer.run(parse_config(argv(reference)))
    killed = tmp_path / "killed"
    code, stderr = fork_with_fault("kill-in-step", 3, argv(killed), tmp_path / "killed.log")
    assert code == -signal.SIGKILL, stderr
    assert complete_steps(killed) == [2]
    sft_trainer.run(parse_config(argv(killed)))
    assert complete_steps(killed) == [2, 4, 6]
    assert_same_losses(losses(killed), losses(reference))
    final = load_file(killed / "final" / "adapter_model.safetensors")
    want = load_file(reference / "final" / "adapter_model.safetensors")
    assert final.keys() == want.keys() and all(torch.equal(final[k], want[k]) for k in want)


@needs_bnb
@pytest.mark.slow
def test_evaluation_between_steps_leaves_qlora_training_unchanged(tiny_model_dir, data_file, tmp_path):
    """bitsandbytes' CPU inference repack would make the steps after an evaluation train on wrong gradients."""
    validation = write_json(tmp_path / "validation.json", text_rows(1))

    def argv(out, *extra):
        return qlora_argv(tiny_model_dir, data_file, out, "--save_strategy", "no", "--max_steps", "4") + [
            *("--logging_strategy", "steps", "--logging_steps", "1", *extra)
        ]

    sft_trainer.run(parse_config(argv(tmp_path / "plain")))
    evaluated = argv(tmp_path / "evaluated", "--validation_data_path", str(validation))
    sft_trainer.run(parse_config([*evaluated, "--eval_strategy", "steps", "--eval_steps", "1"]))
    assert len(read_training_logs(tmp_path / "evaluated", "validation_loss")) == 4
    assert_same_losses(losses(tmp_path / "evaluated"), losses(tmp_path / "plain"))
