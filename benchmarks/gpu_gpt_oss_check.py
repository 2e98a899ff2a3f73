"""gpt-oss GPU check (one Hopper-class GPU, a few minutes): the CPU tests of tests/test_mxfp4.py again in
bf16 with a real flash kernel, with timings. NOT RUN YET: written without a GPU; numbers come from
whoever runs it.

A small gpt-oss (random weights, 8 experts, attention sinks, written in the real MXFP4 checkpoint
layout by tuning/testing/tiny_gpt_oss.py; nothing is downloaded except the attention kernel) is checked for:

1. dequantized load: every expert weight equals the MXFP4 values exactly, in bf16;
2. attention: which kernel ``--flash_attn_implementation kernels-community/vllm-flash-attn3`` really
   gets (needs the ``kernels`` package and the kernel in the hub cache or hub access), and LoRA
   all-linear forward+backward+step time, tokens/s and peak memory with it vs eager at the same
   sequence length, plus the first-step loss difference between the two;
3. ``--dequantize False``: what this machine says (Hopper: transformers' own verdict on training MXFP4);
4. the real CLI: a LoRA run (bf16, MXFP4 checkpoint, hub kernel) completes and reports tokens/s.

Prints a table and writes gpu_gpt_oss_check.json next to this file.

    python benchmarks/gpu_gpt_oss_check.py            # on the GPU machine
    python benchmarks/gpu_gpt_oss_check.py --smoke    # seconds on CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KERNEL = "kernels-community/vllm-flash-attn3"
SMALL = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=1024, head_dim=64, num_hidden_layers=4,
    num_attention_heads=16, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=4,
    sliding_window=128, max_position_embeddings=8192, initializer_range=0.02,
)  # fmt: skip
SMOKE = dict(SMALL, vocab_size=400, hidden_size=64, intermediate_size=64, head_dim=16, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)  # fmt: skip


def check_exact_load(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from tuning.testing.tiny_gpt_oss import unpack_mxfp4

    model = load(path, "eager", lora=True)
    files = load_file(path / "model.safetensors")
    names = [
        n for n in dict(model.named_parameters()) if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
    ]
    exact = all(
        torch.equal(model.get_parameter(n).float(), unpack_mxfp4(files[f"{n}_blocks"], files[f"{n}_scales"]))
        for n in names
    )
    return {"expert_tensors": len(names), "exact": exact, "dtype": str(model.get_parameter(names[0]).dtype)}


def load(path: Path, attn: str, lora: bool):
    from tuning.config.args import DataArgs, ModelArgs, QuantArgs
    from tuning.model import load_model, load_model_config, load_tokenizer, precision_plan
    from tuning.model.quantization import quantization_config

    args = ModelArgs(model_name_or_path=str(path), torch_dtype="bfloat16", flash_attn_implementation=attn)
    config = load_model_config(args)
    method = "lora" if lora else "none"
    quant = quantization_config(QuantArgs(quantization_method="mxfp4"), config, method)
    return load_model(args, precision_plan(args, config, method), load_tokenizer(args, DataArgs()), quant)


def time_lora(path: Path, attn: str, seq_len: int, steps: int, device: str) -> dict:
    import torch

    from tuning.config.args import ModelArgs, PeftArgs
    from tuning.model import precision_plan
    from tuning.model.peft import apply_peft, wrapped_summary
    from tuning.model.tokenizer import load_tokenizer

    model = load(path, attn, lora=True)
    used = model.config._attn_implementation
    plan = precision_plan(ModelArgs(torch_dtype="bfloat16"), model.config, "lora")
    tokenizer = load_tokenizer(ModelArgs(model_name_or_path=str(path)), _data_args())
    peft = apply_peft(
        PeftArgs(peft_method="lora", target_modules=["all-linear"], lora_dropout=0.0), model, tokenizer, plan
    )
    peft.to(device).train()
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, seq_len), generator=gen).to(device)
    losses, times = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    steady = times[1:] or times  # the first step includes kernel compilation / autotuning
    return {
        "requested": attn,
        "used": used,
        "wrapped": wrapped_summary(peft),
        "seq_len": seq_len,
        "step_seconds": sum(steady) / len(steady),
        "tokens_per_second": seq_len / (sum(steady) / len(steady)),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def _data_args():
    from tuning.config.args import DataArgs

    return DataArgs()


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def check_keep_mxfp4(path: Path) -> str:
    from tuning.config.args import ModelArgs, QuantArgs
    from tuning.errors import UserError
    from tuning.model import load_model_config
    from tuning.model.quantization import quantization_config

    config = load_model_config(ModelArgs(model_name_or_path=str(path)))
    try:
        quantization_config(QuantArgs(quantization_method="mxfp4", dequantize=False), config, "lora")
        return "accepted: MXFP4 weights kept (transformers trains them here)"
    except UserError as e:
        return f"refused: {e}"


def cli_run(path: Path, work: Path, seq_len: int, steps: int) -> dict:
    from tuning.config import parse_config
    from tuning.sft_trainer import run

    rng = random.Random(0)
    rows = []
    for _ in range(64):
        ids = [1] + [rng.randrange(3, 300) for _ in range(seq_len - 1)]
        rows.append({"input_ids": ids, "labels": [-100] * (seq_len // 2) + ids[seq_len // 2 :]})
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = [
        *(
            "--model_name_or_path",
            str(path),
            "--training_data_path",
            str(data),
            "--output_dir",
            str(work / "out"),
        ),
        *("--max_steps", str(steps), "--per_device_train_batch_size", "2", "--learning_rate", "2e-4"),
        *("--torch_dtype", "bfloat16", "--gradient_checkpointing", "True", "--save_strategy", "no"),
        *("--peft_method", "lora", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0"),
        *("--target_modules", "all-linear", "--quantization_method", "mxfp4", "--dequantize", "True"),
        *("--flash_attn_implementation", KERNEL, "--max_seq_length", str(seq_len), "--logging_steps", "1"),
    ]
    summary = run(parse_config(argv))
    keys = ("steps", "train_seconds", "trained_tokens_per_second", "peak_memory_bytes", "final_loss")
    return {k: summary.get(k) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script runs")
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=6)
    opts = parser.parse_args()
    import torch

    from tuning.testing.tiny_gpt_oss import write_tiny_gpt_oss

    device = "cuda" if torch.cuda.is_available() and not opts.smoke else "cpu"
    seq_len, steps = (64, 2) if opts.smoke else (opts.seq_len, opts.steps)
    results: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "smoke": opts.smoke,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_gpt_oss(Path(tmp) / "gpt-oss", **(SMOKE if opts.smoke else SMALL))
        results["load"] = check_exact_load(path)
        results["attention"] = [time_lora(path, attn, seq_len, steps, device) for attn in (KERNEL, "eager")]
        results["dequantize_false"] = check_keep_mxfp4(path)
        results["cli"] = cli_run(path, Path(tmp), min(seq_len, 1024), steps)
    flash, eager = results["attention"]
    results["first_loss_difference"] = abs(flash["first_loss"] - eager["first_loss"])
    print(f"device {results['device']}; dequantized load exact: {results['load']}")
    print(f"{'requested':36} {'used':36} {'s/step':>8} {'tokens/s':>10} {'peak GiB':>9} {'loss0':>8}")
    for r in results["attention"]:
        peak = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        print(
            f"{r['requested']:36} {r['used']:36} {r['step_seconds']:8.3f} {r['tokens_per_second']:10.0f} "
            f"{peak:>9} {r['first_loss']:8.4f}"
        )
    print(f"LoRA wraps {flash['wrapped']}; |loss0 flash - eager| = {results['first_loss_difference']:.2e}")
    print(f"--dequantize False: {results['dequantize_false']}")
    print(f"CLI LoRA run: {results['cli']}")
    out = Path(__file__).with_name("gpu_gpt_oss_check" + ("_smoke" if opts.smoke else "") + ".json")
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
