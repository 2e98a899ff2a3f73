"""GPU benchmark (one H100/H200-class GPU, under 10 minutes): a ~1.2B Llama (Llama-3.2-1B shape,
128k vocabulary, random weights: nothing is downloaded) trained for a few steps on synthetic token ids.

For full fine-tuning and LoRA, on a classification-style and a chat-style workload, it compares
(a) a plain transformers Trainer that pads every batch and computes logits at every position with
(b) our default path (padding-free rows, label-only chunked loss), and prints a table: trained and
processed tokens/s, MFU (6 · params · processed tokens / time / peak bf16 FLOP/s), peak GPU memory,
final loss. Writes JSON next to this file.

    python benchmarks/gpu_benchmark.py                 # on the GPU machine
    python benchmarks/gpu_benchmark.py --smoke         # seconds on CPU: checks the script itself
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

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    rope_theta=500000.0,
)
SMOKE = dict(LLAMA_1B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def synthetic_rows(workload: str, n: int, vocab: int, scale: float) -> list[dict]:
    """Token ids with the length profile of each workload; labels mask what a real job masks."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        if workload == "classification":  # long prompt, a few label tokens
            prompt, answer = int(rng.randint(200, 900) * scale), rng.randint(2, 8)
            segments = [(prompt, False), (answer, True)]
        else:  # multi-turn chat: about half the tokens are assistant turns
            segments = [(int(rng.randint(40, 200) * scale), i % 2 == 1) for i in range(8)]
        ids, labels = [1], [-100]
        for length, trained in segments:
            part = [rng.randrange(3, vocab) for _ in range(max(length, 1))]
            ids += part
            labels += part if trained else [-100] * len(part)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def pad_batch(features: list[dict]):
    """Per-batch right padding (what DataCollatorForSeq2Seq does), for the reference path."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(f["input_ids"]), 1, torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build(config: dict, lora: bool, attn: str, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation=attn)).to(device)
    model.config.use_cache = False
    params = sum(p.numel() for p in model.parameters())
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    return model, params


def run_case(args, workload: str, lora: bool, path: str) -> dict:
    import datasets
    import torch
    from transformers import Trainer, TrainingArguments

    from tuning.config.args import TrainArgs
    from tuning.data import DataStats, PreparedData
    from tuning.model.loading import PrecisionPlan
    from tuning.train.trainer import build_trainer

    cuda = torch.cuda.is_available()
    config = SMOKE if args.smoke else LLAMA_1B
    batch, steps = (2, 2) if args.smoke else (args.batch_size, args.steps)
    rows = synthetic_rows(workload, batch * steps, config["vocab_size"], 0.05 if args.smoke else 1.0)
    dataset = datasets.Dataset.from_list(rows)
    attn = args.attn if cuda else "sdpa"
    model, params = build(config, lora, attn if path == "ours" else "sdpa", "cuda" if cuda else "cpu")
    common = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, num_train_epochs=1,
        learning_rate=1e-4 if lora else 1e-5, seed=42, save_strategy="no", logging_strategy="steps",
        logging_steps=1, report_to="none", bf16=cuda, use_cpu=not cuda, disable_tqdm=True,
    )  # fmt: skip
    if path == "ours":
        data = PreparedData(dataset, None, "pretokenized", DataStats())
        plan = PrecisionPlan(torch.float32, torch.bfloat16 if cuda else None, torch.bfloat16)
        trainer = build_trainer(TrainArgs(**common), model, None, data, plan)
    else:
        trainer = Trainer(
            model=model, args=TrainingArguments(**common), train_dataset=dataset, data_collator=pad_batch
        )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    real = sum(len(r["input_ids"]) for r in rows)
    trained = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "workload": workload,
        "mode": "lora" if lora else "full",
        "path": path,
        "attention": attn if path == "ours" else "sdpa",
        "params": params,
        "seconds": seconds,
        "trained_tokens_per_s": trained / seconds,
        "tokens_per_s": real / seconds,
        "mfu": 6 * params * real / seconds / PEAK_BF16_FLOPS,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "final_loss": losses[-1],
    }
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: check the script only")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--attn", default="flash_attention_2", help="attention for our path on GPU")
    parser.add_argument("--out", default=str(Path(__file__).parent / "gpu_results.json"))
    args = parser.parse_args()
    if not args.smoke:
        import importlib.util

        if args.attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            args.attn = "sdpa"  # padding-free still exact on sdpa (block-diagonal mask), just slower
    results = []
    for workload in ("classification", "chat"):
        for lora in (False, True):
            for path in ("reference", "ours"):
                results.append(run_case(args, workload, lora, path))
                r = results[-1]
                print(
                    f"{workload:14s} {r['mode']:4s} {path:9s} {r['trained_tokens_per_s']:9.0f} trained tok/s "
                    f"{r['tokens_per_s']:9.0f} tok/s  MFU {r['mfu']:.1%}  peak {r['peak_gpu_gib'] or 0:.1f} GiB "
                    f"loss {r['final_loss']:.4f}",
                    flush=True,
                )
    Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
