"""What issue 26's features cost on a small CPU job: token accuracy, sample generations, early stopping
and the serve-exact check, against the commit before them.

    python benchmarks/eval_extras_cost.py --base /path/to/checkout/before [--repeats 3]

The job: the tiny Llama (tuning.testing.tiny_model) on examples/data/support_tickets.jsonl (80 rows,
the demo's formatter template), 5 epochs, batch 4, float32, logging every step, the final model saved.
Whole processes, variants interleaved per repeat; each run's wall time (start to exit) and, from
run_summary.json, ``train_seconds`` and the features' own seconds. Variants:

- base / ours, no eval set, default flags (ours: token accuracy and the serve check are on);
- ours with ``--serve_check off`` (the check's share of the default);
- base / ours with an eval set evaluated every epoch (ours adds validation token accuracy);
- ours + ``--eval_generations 4 --eval_max_new_tokens 32``;
- ours + ``--early_stopping_patience 3``.

Writes ``benchmarks/eval_extras_cost.json`` and prints a markdown table (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data" / "support_tickets.jsonl"
JOB = [
    "--training_data_path", str(DATA),
    "--data_formatter_template", "### Input: {{input}} \n\n## Label: {{output}}", "--response_template", "\n## Label:",
    "--num_train_epochs", "5", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
    "--torch_dtype", "float32", "--logging_strategy", "steps", "--logging_steps", "1", "--save_strategy", "no",
]  # fmt: skip
EVAL = ["--validation_data_path", str(DATA), "--eval_strategy", "epoch"]
VARIANTS = {
    "base, no eval set": ("base", []),
    "ours, no eval set": ("ours", []),
    "ours, no eval set, --serve_check off": ("ours", ["--serve_check", "off"]),
    "base, eval every epoch": ("base", EVAL),
    "ours, eval every epoch": ("ours", EVAL),
    "ours, eval + --eval_generations 4 (32 tokens)": ("ours", [*EVAL, "--eval_generations", "4", "--eval_max_new_tokens", "32"]),
    "ours, eval + --early_stopping_patience 3": (
        "ours", [*EVAL, "--early_stopping_patience", "3", "--save_strategy", "epoch", "--save_total_limit", "1"]
    ),
}  # fmt: skip


def run(checkout: Path, model: Path, out: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "tuning.sft_trainer", "--model_name_or_path", str(model), *JOB, *extra]
    argv += ["--output_dir", str(out), "--save_model_dir", str(out / "final")]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    summary = json.loads((out / "run_summary.json").read_text())
    generations = summary.get("eval_generations") or {}
    return {
        "wall_seconds": wall,
        "train_seconds": summary["train_seconds"],
        "generation_seconds": sum(generations.get("seconds", [])),
        "serve_check_seconds": (summary.get("serve_check") or {}).get("seconds", 0.0),
        "steps": summary["steps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="a checkout of the commit before issue 26")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "eval_extras_cost.json"))
    args = parser.parse_args()
    from tuning.testing.tiny_model import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="eval-extras-"))
    model = write_tiny_model(work / "model")
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for r in range(args.repeats):
        for name, (which, extra) in VARIANTS.items():
            checkout = Path(args.base) if which == "base" else REPO
            results[name].append(
                run(checkout, model, work / f"run-{r}-{len(results[name])}-{hash(name) & 0xFFFF}", extra)
            )
    table = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    Path(args.out).write_text(json.dumps({"medians": table, "runs": results}, indent=2) + "\n")
    print("| variant | wall s | train s | generation s | serve check s | steps |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, m in table.items():
        print(
            f"| {name} | {m['wall_seconds']:.2f} | {m['train_seconds']:.2f} | {m['generation_seconds']:.2f} | "
            f"{m['serve_check_seconds']:.2f} | {m['steps']:.0f} |"
        )


if __name__ == "__main__":
    main()
