"""The memory plan a new user meets first: the README's own `tuning plan` example, GPU sizes as they are
sold (``80GB``, ``H100-80GB``), and parameter counts equal to the model's own, tied weights once."""

from __future__ import annotations

import re
import shlex

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.conftest import REPO
from tests.test_memory import CONFIGS, setup
from tuning import plan as plan_command
from tuning.errors import UserError
from tuning.model.memory import estimate
from tuning.model.memory_check import gpu_memory, parse_size
from tuning.testing.tiny_gpt_oss import build_gpt_oss
from tuning.tiny import tiny_config
from tuning.train.loss import VERIFIED_ARCHITECTURES

MiB, GiB = 2**20, 2**30
REAL = REPO.parent / "shared" / "real-tokenizers"


def test_gpu_memory_reads_sizes_as_gpus_are_sold():
    # what the driver reports for each card (nvidia-smi "Total", MiB)
    assert gpu_memory("H100-80GB")[0] == gpu_memory("h100 80gb")[0] == gpu_memory("H100")[0] == 81559 * MiB
    assert gpu_memory("A100-40GB") == (40960 * MiB, "one A100-40GB")
    # a label's "80GB" is the least of the cards sold as 80 GB (H100: 79.65 GiB), never 80 x 10^9 bytes
    size, what = gpu_memory("80GB")
    assert size == 81559 * MiB and "read as 79.65 GiB (the H100-80GB's; the least of" in what
    assert gpu_memory("24GB")[0] == 23028 * MiB  # A10G, the least of the 24 GB cards listed
    assert gpu_memory("96GB") == (96 * GiB, "a GPU sold as 96GB, read as 96 GiB")  # no card known: nominal
    assert gpu_memory("79.6GiB") == (int(79.6 * GiB), "a GPU with 79.6GiB")  # an exact size is exact
    assert parse_size("80GiB") == parse_size("80g") == 80 * GiB and parse_size("512 MiB") == 512 * MiB
    with pytest.raises(UserError, match="'A100' names several cards; pick one: A100-80GB, A100-40GB"):
        gpu_memory("A100")
    with pytest.raises(UserError, match="--device_memory 'lots' is not a size or a known GPU"):
        gpu_memory("lots")


def _readme_plan_command() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^tuning plan (.*?)(?<!\\)$", readme, flags=re.M | re.S)
    assert match, "README.md has no `tuning plan` example"
    line = re.sub(r"\\\n|#[^\n]*", " ", match.group(1))
    return shlex.split(line)


def test_the_readme_plan_example_fits_llama_3_1_8b_on_an_80gb_gpu(capsys):
    """The README's example as a user types it, for Llama-3.1-8B: fits an 80 GB H100 (79.65 GiB)."""
    argv = [str(CONFIGS / "llama-3.1-8b") if a == "$MODEL_PATH" else a for a in _readme_plan_command()]
    assert "--device_memory" in argv
    assert plan_command.main(argv) == 0
    verdict = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert verdict.endswith("(2.00 GiB kept for the CUDA runtime): fits"), verdict
    assert "of 77.65 GiB usable on a GPU sold as 80GB, read as 79.65 GiB (the H100-80GB's" in verdict


def test_a_device_memory_typo_is_refused_before_the_model_is_read(capsys, tmp_path):
    argv = ["--model_name_or_path", str(tmp_path / "nothing here"), "--device_memory", "80 gigs"]
    assert plan_command.main(argv) == 1
    assert "--device_memory '80 gigs' is not a size or a known GPU" in capsys.readouterr().err


def _meta_parameters(config) -> int:
    """The model's own count: every distinct parameter once (a tied head is the embedding)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return sum(p.numel() for p in model.parameters())


_SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.mark.parametrize("model_type", sorted(VERIFIED_ARCHITECTURES), ids=lambda t: t.replace("_", "-"))
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_plan_counts_each_parameter_once(model_type, tied):
    """Every architecture the tests build, small: the plan's count is the model's own (tied weights once)."""
    config = AutoConfig.for_model(model_type, **_SMALL, tie_word_embeddings=tied)
    assert estimate(setup(config)).parameters == _meta_parameters(config)


def test_the_plan_counts_the_tiny_gpt_oss_and_qwen3_of_the_tests():
    gpt_oss = build_gpt_oss(64).config
    assert estimate(setup(gpt_oss)).parameters == _meta_parameters(gpt_oss)
    if not (REAL / "qwen3").is_dir():
        pytest.skip(f"real Qwen3 config not found at {REAL / 'qwen3'}")
    tiny = tiny_config(REAL / "qwen3")
    assert tiny.tie_word_embeddings
    # 151936 x 32 embedding (tied) + 2 layers; the run's own log says 4,880,576 parameters
    assert estimate(setup(tiny)).parameters == _meta_parameters(tiny) == 4_880_576


@pytest.mark.parametrize(
    ("family", "published"),
    [("qwen3", 596_049_920), ("llama3.2", 1_235_814_400), ("mistral-v0.3", 7_248_023_552), ("gpt-oss", None)],
)
def test_the_plan_counts_real_configs_like_the_model(family, published):
    """Qwen3-0.6B and Llama-3.2-1B tie their head to the embedding: counted once, as published."""
    if not (REAL / family / "config.json").is_file():
        pytest.skip(f"real {family} config not found under {REAL}")
    config = AutoConfig.from_pretrained(REAL / family)
    counted = estimate(setup(config)).parameters
    assert counted == _meta_parameters(config)
    if published is not None:
        assert counted == published


def test_the_plan_counts_an_adapter_on_a_tied_model_like_peft():
    config = AutoConfig.for_model("qwen3", **_SMALL, tie_word_embeddings=True)
    plan = estimate(setup(config, peft="lora"))
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    trainable, total = model.get_nb_trainable_parameters()
    assert (plan.trainable, plan.parameters) == (trainable, total)
