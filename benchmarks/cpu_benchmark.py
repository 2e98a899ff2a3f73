"""CPU benchmark: our default training path vs a plain transformers Trainer that pads every batch and
computes logits at every position. Same data, model, seed, batches and optimizer; runs alternate, each
in its own process (so peak RSS is that run's).

    python benchmarks/cpu_benchmark.py [--reps 2] [--tokenizer DIR] [--out benchmarks/cpu_results.json]
    python benchmarks/cpu_benchmark.py --paths ours bfd wrapped   # packing vs padding-free, side by side

Paths: ``reference`` (plain Trainer), ``ours`` (defaults: padding-free batches), ``bfd`` and ``wrapped``
(our defaults on rows packed with ``--packing_strategy bfd`` / ``wrapped``: one row per step, of
batch-size × mean-sample-length tokens, so a step holds about the tokens of an unpacked batch).
Prints a markdown table (trained tokens/s, padding share, peak RSS, final loss, speed-ups) and writes
JSON. The model is tiny but has a real vocabulary (hidden 256, 2 layers, 32k vocab), so the output head
costs what it costs in real models relative to the rest: most of the compute.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKENIZER = "/work/shared/peer-data/fms-hf-tuning/tinyllama-tokenizer"
WORKLOADS = {
    # name: (rows, batch size, description)
    "classification": (128, 8, "~230-token prompt, 1-3 token label + EOS trained"),
    "chat": (48, 4, "4-turn chat, ~600 tokens, assistant turns (~55%) trained"),
}
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "sa",
    "ti",
    "vo",
    "pe",
    "da",
    "ri",
    "mo",
    "lu",
    "ze",
    "fa",
    "no",
    "gi",
    "be",
    "ha",
    "ju",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(n))


def write_rows(workload: str, path: Path) -> None:
    rng = random.Random(0)
    rows = []
    for _ in range(WORKLOADS[workload][0]):
        if workload == "classification":
            review = words(rng, rng.randint(60, 110))
            label = rng.choice(["positive", "negative", "neutral", "mixed feelings"])
            rows.append(
                {"input": f"Classify the review.\n\nReview: {review}\n\nLabel:", "output": f" {label}"}
            )
        else:
            messages = []
            for _ in range(4):
                messages.append({"role": "user", "content": words(rng, rng.randint(15, 35))})
                messages.append({"role": "assistant", "content": words(rng, rng.randint(25, 50))})
            rows.append({"messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def build_model(vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).float()
    model.config.use_cache = False
    return model


class CountingCollator:
    """Wraps a collator to count the positions it hands the model and how many are padding."""

    def __init__(self, inner) -> None:
        self.inner, self.positions, self.padding = inner, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.positions += batch["input_ids"].numel()
        if "attention_mask" in batch:
            self.padding += int((batch["attention_mask"] == 0).sum())
        return batch


PATHS = ("reference", "ours", "bfd", "wrapped")


def run_one(path: str, workload: str, tokenizer_dir: str) -> dict:
    import torch
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tuning.config.args import DataArgs, TrainArgs
    from tuning.data import build_datasets
    from tuning.data.batching import pack, sample_lengths
    from tuning.model.loading import PrecisionPlan
    from tuning.train.trainer import build_trainer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tmp = Path(tempfile.mkdtemp())
    write_rows(workload, tmp / "data.jsonl")
    data = build_datasets(
        DataArgs(training_data_path=str(tmp / "data.jsonl"), chat_template=CHAT_TEMPLATE),
        tokenizer,
        2048,
        (tokenizer.eos_token_id,),
    )
    model = build_model(len(tokenizer))
    common = dict(
        output_dir=str(tmp / "out"),
        per_device_train_batch_size=WORKLOADS[workload][1],
        num_train_epochs=1,
        learning_rate=1e-3,
        optim="adamw_torch",
        seed=42,
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    if path in ("bfd", "wrapped"):  # packed rows, each about one unpacked batch of tokens
        lengths = sample_lengths(data.train)
        block = max(max(lengths), -(-WORKLOADS[workload][1] * sum(lengths) // len(lengths)))
        data.train = pack(data.train, block, path)
        common["per_device_train_batch_size"] = 1
    if path != "reference":  # our defaults: padding-free rows, label-only chunked loss
        plan = PrecisionPlan(torch.float32, None, torch.float32)
        trainer = build_trainer(TrainArgs(**common), model, tokenizer, data, plan)
    else:  # what a plain transformers user writes: pad each batch, the model's full-logits loss
        tokenizer.pad_token = tokenizer.eos_token
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        trainer = Trainer(
            model=model, args=TrainingArguments(**common), train_dataset=data.train, data_collator=collator
        )
    trainer.data_collator = counting = CountingCollator(trainer.data_collator)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "path": path,
        "workload": workload,
        "seconds": seconds,
        "trained_tokens": data.stats.trained_tokens,
        "real_tokens": data.stats.total_tokens,
        "positions": counting.positions,
        "padding_share": counting.padding / counting.positions,
        "cpu_seconds": cpu_seconds,
        "trained_tokens_per_s": data.stats.trained_tokens / seconds,
        # one thread: CPU time is the work done, unaffected by other processes sharing the cores
        "trained_tokens_per_cpu_s": data.stats.trained_tokens / cpu_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": losses[-1],
        "mean_loss": sum(losses) / len(losses),
        "steps": trainer.state.global_step,
    }


def run_child(path: str, workload: str, tokenizer_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", path, workload, "--tokenizer", tokenizer_dir]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{path}/{workload} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> list[dict]:
    """Per workload: medians per path, and each path's ratio to the first path run (the baseline)."""
    rows = []
    order = [p for p in PATHS if any(r["path"] == p for r in runs)]
    for workload in WORKLOADS:
        by_path = {}
        for path in order:
            mine = [r for r in runs if r["workload"] == workload and r["path"] == path]
            if not mine:
                continue
            by_path[path] = {
                "trained_tokens_per_s": statistics.median(r["trained_tokens_per_s"] for r in mine),
                "trained_tokens_per_cpu_s": statistics.median(r["trained_tokens_per_cpu_s"] for r in mine),
                "padding_share": mine[0]["padding_share"],
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
                "final_loss": mine[0]["final_loss"],
                "mean_loss": mine[0]["mean_loss"],
                "trained_tokens": mine[0]["trained_tokens"],
                "real_tokens": mine[0]["real_tokens"],
                "steps": mine[0]["steps"],
            }
        if len(by_path) < 2:
            continue
        base = by_path[order[0]]
        for stats in by_path.values():
            stats["speedup"] = stats["trained_tokens_per_s"] / base["trained_tokens_per_s"]
            stats["speedup_cpu_time"] = stats["trained_tokens_per_cpu_s"] / base["trained_tokens_per_cpu_s"]
        rows.append({"workload": workload, "baseline": order[0], **by_path})
    return rows


def table(rows: list[dict]) -> str:
    baseline = rows[0]["baseline"] if rows else "reference"
    lines = [
        "| workload | path | steps | trained tok/s | tok/CPU-s | padding share | peak RSS MiB | final loss "
        f"| mean loss | vs {baseline} (wall) | vs {baseline} (CPU time) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        for path in PATHS:
            if path not in row:
                continue
            r = row[path]
            lines.append(
                f"| {row['workload']} | {path} | {r['steps']} | {r['trained_tokens_per_s']:.1f} | "
                f"{r['trained_tokens_per_cpu_s']:.1f} | {r['padding_share']:.1%} | "
                f"{r['peak_rss_mib']:.0f} | {r['final_loss']:.4f} | {r['mean_loss']:.4f} | "
                f"{r['speedup']:.2f}× | {r['speedup_cpu_time']:.2f}× |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--tokenizer", default=TOKENIZER)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--paths", nargs="+", default=["reference", "ours"], choices=PATHS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "cpu_results.json"))
    parser.add_argument("--child", nargs=2, metavar=("PATH", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child, args.tokenizer)))
        return
    runs = []
    for rep in range(args.reps):
        for workload in args.workloads:
            for path in args.paths if rep % 2 == 0 else args.paths[::-1]:  # alternate the order
                runs.append(run_child(path, workload, args.tokenizer))
                r = runs[-1]
                print(
                    f"rep {rep} {workload:14s} {path:9s} {r['trained_tokens_per_s']:8.1f} trained tok/s",
                    flush=True,
                )
    rows = summarise(runs)
    Path(args.out).write_text(json.dumps({"runs": runs, "summary": rows}, indent=1), encoding="utf-8")
    print(table(rows))


if __name__ == "__main__":
    main()
