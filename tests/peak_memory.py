"""Measured activation and logits memory of one forward + backward on CPU, to check the memory plan's
terms against (tests/test_memory.py, benchmarks/memory_benchmark.py). A test helper, kept out of the package: it
reaches into the model and train stages.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/peak_memory.py '[SHAPE, ...]'

prints one JSON line per shape: a seeded random float32 Llama built from the shape's config, its
gradients allocated up front (so they are part of the baseline, not of the growth), one small warm-up
pass (libraries' lazy buffers), then the measured pass: the peak resident memory during its forward and
backward (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident memory just before it.

Why RSS and not torch's profiler: the profiler's own records grow with the pass. Why the malloc
setting: glibc's adaptive mmap threshold would keep freed tensors in its heap, so a later pass would
reuse them without growing; a fixed threshold gives every tensor its own mapping, returned on free.
Linux only (``/proc``).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
SHAPES = [  # tests/test_memory.py and benchmarks/memory_benchmark.py: activations or logits dominating
    {
        "config": dict(
            vocab_size=8000,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
        ),
        "batch": 2,
        "seq": 1024,
        "loss": "standard",
    },
    {
        "config": dict(
            vocab_size=50000,
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        "batch": 4,
        "seq": 256,
        "loss": "standard",
    },
    {
        "config": dict(
            vocab_size=16000,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
        ),
        "batch": 1,
        "seq": 4096,  # two label-only chunks: the second recomputed in backward
        "loss": "label_only",
    },
]


def llama_config(shape: dict[str, Any]) -> LlamaConfig:
    return LlamaConfig(
        **shape["config"], attn_implementation="sdpa", use_cache=False, tie_word_embeddings=False
    )


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def can_measure() -> str | None:
    """Why this machine can't measure (None: it can)."""
    try:
        reset_peak()
        peak_resident()
    except OSError as e:
        return f"no resettable peak RSS here (/proc/self/clear_refs: {e})"
    return None


def measure(shape: dict[str, Any]) -> dict[str, int]:
    """Growth of resident memory over one forward + backward of ``shape`` (batch × seq tokens, all
    trained; ``loss``: ``standard`` for the model's own, ``label_only`` for tuning/train/loss.py's)."""
    from tuning.train.loss import label_only_forward

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(shape))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ids = torch.randint(3, model.config.vocab_size, (shape["batch"], shape["seq"]))

    def step(model: Any, batch: torch.Tensor) -> None:
        # only the loss survives the forward, as in the Trainer's training_step (its outputs, logits
        # included, are dropped before backward)
        if shape.get("loss", "standard") == "label_only":
            with label_only_forward(model):
                loss = model(input_ids=batch, labels=batch).loss
        else:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()

    step(model, ids[:, :8])
    gc.collect()
    before = resident()
    reset_peak()
    step(model, ids)
    grown = peak_resident() - before
    del model
    gc.collect()
    return {"before": before, "grown": grown}


def measure_in_subprocess(shapes: list[dict[str, Any]]) -> list[dict[str, int]]:
    """:func:`measure` for each shape, in one fresh interpreter with the malloc setting."""
    import subprocess

    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(shapes)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **MALLOC_ENV, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"peak memory measurement failed: {result.stderr[-2000:]}")
    return [json.loads(line) for line in result.stdout.splitlines()]


def planned(shape: dict[str, Any]) -> dict[str, int]:
    """The memory plan's activations and logits for one micro-batch of ``shape`` (float32, sdpa, rows
    without padding), as the run would plan them."""
    from tuning.config.args import ModelArgs, PeftArgs, QuantArgs
    from tuning.model.loading import PrecisionPlan
    from tuning.model.memory import Setup, Workload, estimate

    work = Workload(batch_size=shape["batch"], seq_len=shape["seq"], padding_free=False, loss=shape["loss"])
    plan = estimate(
        Setup(
            llama_config(shape),
            ModelArgs(model_name_or_path="m", use_flash_attn=False),
            PeftArgs(),
            QuantArgs(),
            PrecisionPlan(torch.float32, None, torch.float32),
            work,
            gpu=False,
        )
    )
    if plan.decisions["loss"] != shape["loss"] or plan.autocast_copies:
        raise RuntimeError(f"the plan decided {plan.decisions['loss']} for {shape}")
    working = plan.activations + plan.logits
    return {"activations": plan.activations, "logits": plan.logits, "working": working}


def main(argv: list[str]) -> None:
    for shape in json.loads(argv[0]):
        print(json.dumps(measure(shape)), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1:])
