"""The start path imports nothing beyond what the Hugging Face training stack itself imports.

Start-up is part of every run's wall time (benchmarks/e2e_profile.md). What is left of it is torch,
transformers' Trainer and model code, accelerate, datasets, and peft: ``transformers.trainer_utils``
imports peft whenever it is installed (and peft imports bitsandbytes whenever *that* is installed), so
no code of ours can keep peft out of a full fine-tune short of hiding it from transformers. What we can
guard is that our own modules add nothing on top: trackers, plotting, merging, quantization helpers and
the like load when a run uses them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

# What any run of the Hugging Face Trainer on a causal LM imports anyway.
STACK = (
    "import torch, transformers, datasets, accelerate, safetensors, yaml, jinja2\n"
    "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments\n"
    "from transformers import TrainerCallback\n"
    "from transformers.models.llama import modeling_llama\n"
)
REPORT = "import sys, json; print(json.dumps(sorted(sys.modules)))"
# loaded only by the runs that use them
LATER = ["matplotlib", "tuning.merge", "tuning.plot", "tuning.preview", "tuning.launch"]


def modules_after(code: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", code + "\n" + REPORT], capture_output=True, text=True, cwd=REPO, check=True
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_the_entry_point_imports_only_the_training_stack():
    stack = modules_after(STACK)
    ours = modules_after("import tuning.sft_trainer")
    extra_packages = sorted({m.split(".")[0] for m in ours - stack} - {"tuning", "transformers"})
    assert not extra_packages, f"the entry point imports more than the training stack: {extra_packages}"
    extra_transformers = sorted(m for m in ours - stack if m.startswith("transformers."))
    assert extra_transformers == ["transformers.hf_argparser"]  # our parser builds on HfArgumentParser
    early = [m for m in LATER if m in ours] + sorted(
        # each tracker's module; the protocol they share is part of the package's surface
        m
        for m in ours
        if m.startswith("tuning.trackers.") and m != "tuning.trackers.protocol"
    )
    assert not early, f"loaded at start although only some runs use them: {early}"


def test_the_tuning_command_imports_no_library_before_a_command_runs():
    """`tuning --help`, a mistyped command and the start of every command (where a stop signal must
    already end with one line) come before torch, transformers, peft and datasets are imported."""
    loaded = modules_after("import tuning.cli, tuning.errors, tuning.logs, tuning.tiny")
    heavy = sorted(m for m in loaded if m.split(".")[0] in ("torch", "transformers", "peft", "datasets"))
    assert not heavy, f"imported before any command runs: {heavy[:5]}"
    # the sft_trainer entry as a program: only run_program before the stages import (inside run_command)
    source = (REPO / "tuning" / "sft_trainer.py").read_text(encoding="utf-8")
    assert source.index('if __name__ == "__main__":') < source.index("from tuning.config import")


@pytest.mark.slow
def test_the_startup_benchmark_still_times_every_stage_of_the_real_entry_point(tmp_path):
    """benchmarks/startup.py wraps the entry point's stages by name: a renamed stage must fail here, not
    on the day someone measures."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("startup", REPO / "benchmarks" / "startup.py")
    startup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(startup)
    result = startup.first_step(tmp_path)
    assert result["code"] == 0
    marks = list(result["marks"].items())
    assert [name for name, _ in marks] == [
        "python started",
        "imports (tuning.sft_trainer)",
        "command line parsed",
        "tokenizer (+ processor)",
        "model config + memory plan",
        "data",
        "weights",
        "trainer",
        "first step",
    ]
    assert all(a <= b for (_, a), (_, b) in zip(marks, marks[1:], strict=False))
