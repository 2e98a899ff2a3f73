"""Which mode fits which model on which GPU, from the memory plan (docs/memory.md).

    python benchmarks/memory_plans.py [--seq_len 4096] [--batch 1] [--out benchmarks/memory_plans.json]

For the hand-written configs in benchmarks/model_configs/ (Llama-2-7B, Llama-3-70B, gpt-oss-120b; shapes
from their published config.json, no weights) and each mode, prints the per-GPU peak the plan predicts
(a flash attention kernel, label-only loss, AdamW) and which GPUs it fits: one GPU of 24, 40, 80 or 141 GB,
or 8 x 80 GB under FSDP. Pure arithmetic: runs anywhere in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoConfig  # noqa: E402

from tuning.config.args import ModelArgs, PeftArgs, QuantArgs  # noqa: E402
from tuning.model.loading import precision_plan  # noqa: E402
from tuning.model.memory import Setup, Topology, Workload, estimate  # noqa: E402
from tuning.model.memory_check import GPU_RUNTIME_RESERVE  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "model_configs"
MODELS = ("llama-2-7b", "llama-3-70b", "gpt-oss-120b")
GiB = 2**30
# usable memory as torch reports it (nominal sizes: 24 GB L4/RTX 4090, 40 and 80 GB A100, 80 GB H100, 141 GB H200)
GPUS = {"24 GB": 22.0, "40 GB": 39.4, "80 GB": 79.1, "141 GB": 139.7}
MODES = {
    # name: (peft_method, quantization_method, master_weights)
    "full, float32 master": ("none", "none", "float32"),
    "full, kahan (default)": ("none", "none", "kahan"),
    "full, pure bf16": ("none", "none", "half"),
    "LoRA r=16, all-linear": ("lora", "none", "auto"),
    "QLoRA NF4 r=16, all-linear": ("lora", "bnb_4bit", "auto"),
}


def plan(model: str, mode: str, workload: Workload, topology: Topology) -> int:
    peft, quant, master = MODES[mode]
    config = AutoConfig.from_pretrained(CONFIGS / model)
    model_args = ModelArgs(model_name_or_path=model, master_weights=master)
    peft_args = PeftArgs(
        peft_method=peft,
        lora_r=16,
        lora_dropout=0.0,
        target_modules=["all-linear"] if peft != "none" else None,
    )
    precision = precision_plan(model_args, config, peft, workload.optim)
    setup = Setup(
        config,
        model_args,
        peft_args,
        QuantArgs(quantization_method=quant),
        precision,
        workload,
        topology,
        gpu=True,
    )
    return estimate(setup).total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "memory_plans.json"))
    args = parser.parse_args()
    workload = Workload(batch_size=args.batch, seq_len=args.seq_len, gradient_checkpointing=True)
    reserve = GPU_RUNTIME_RESERVE / GiB
    rows, lines = (
        [],
        [
            "| model | mode | peak per GPU, 1 GPU | fits one GPU of | peak per GPU, FSDP 8 x 80 GB | fits 8 x 80 GB |",
            "| --- | --- | ---: | --- | ---: | --- |",
        ],
    )
    for model in MODELS:
        for mode in MODES:
            one = plan(model, mode, workload, Topology()) / GiB
            eight = plan(model, mode, workload, Topology(8, sharded=True)) / GiB
            fits = [name for name, size in GPUS.items() if one <= size - reserve]
            lines.append(
                f"| {model} | {mode} | {one:.1f} GiB | {fits[0] + ' or more' if fits else 'none'} | "
                f"{eight:.1f} GiB | {'yes' if eight <= GPUS['80 GB'] - reserve else 'no'} |"
            )
            rows.append({"model": model, "mode": mode, "one_gpu_gib": one, "fsdp8_gib": eight, "fits": fits})
    print(
        f"batch {args.batch} x {args.seq_len} tokens per GPU, gradient checkpointing, {reserve:g} GiB runtime reserve"
    )
    print("\n".join(lines))
    Path(args.out).write_text(
        json.dumps({"batch": args.batch, "seq_len": args.seq_len, "rows": rows}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
