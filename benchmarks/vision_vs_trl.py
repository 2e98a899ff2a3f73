"""Image+text SFT on CPU: `tuning` vs TRL's ``SFTTrainer``, same tiny VLM, same rows, one run.

A tiny random Qwen2.5-VL (``tuning.testing.tiny_vlm`` from ``../shared/real-processors/qwen2.5-vl``) and
``--rows`` single-image chat rows (84x56..168x56 PNGs). Measured side by side:

- preprocessing rows/s: `tuning` prepares every row once before training (template, processor expansion,
  labels, every image opened and checked); TRL prepares nothing ahead for image rows (its collator renders
  and processes each batch during training), so it has no number here;
- training: steps/s and trained tokens/s over ``--steps`` steps of batch 4 (float32, one thread). TRL's
  vision collator trains every text token (``assistant_only_loss`` is not supported with images in TRL
  1.16); `tuning` trains the assistant turns only, so trained tokens differ: compare steps/s.

TRL must be importable (it is not a dependency). Install it in a throwaway venv that sees the same
torch/transformers:

    python -m venv --system-site-packages /tmp/trl && /tmp/trl/bin/pip install --no-deps trl
    OMP_NUM_THREADS=1 PYTHONPATH=. /tmp/trl/bin/python benchmarks/vision_vs_trl.py

Run it on a quiet machine: the seconds are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "real-processors" / "qwen2.5-vl"
COLORS = [
    ("red", (200, 10, 10)),
    ("green", (10, 200, 10)),
    ("blue", (10, 10, 200)),
    ("yellow", (200, 200, 0)),
]


def rows(folder: Path, n: int) -> list[dict]:
    from PIL import Image

    out = []
    for i in range(n):
        name, rgb = COLORS[i % len(COLORS)]
        Image.new("RGB", (84 + 28 * (i % 4), 56), rgb).save(folder / f"img{i}.png")
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]},
        ]
        out.append({"messages": messages, "images": [f"img{i}.png"]})
    return out


def bench_tuning(model: Path, data: Path, out: Path, steps: int) -> dict:
    from tuning import sft_trainer
    from tuning.config import DataArgs, ModelArgs
    from tuning.data.prepare import encoding_context, prepare_path
    from tuning.model import load_processor

    processor = load_processor(
        ModelArgs(model_name_or_path=str(model)), DataArgs(training_data_path=str(data))
    )
    args = DataArgs(training_data_path=str(data))
    start = time.perf_counter()
    ds, _, _ = prepare_path(
        str(data), encoding_context(args, processor.tokenizer, 4096, (151645,), processor)
    )
    prep = time.perf_counter() - start
    flags = (
        f"--model_name_or_path {model} --training_data_path {data} --output_dir {out} --max_steps {steps} "
    )
    flags += "--per_device_train_batch_size 4 --learning_rate 1e-4 --torch_dtype float32 --memory_check warn"
    assert sft_trainer.main(flags.split()) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    return {
        "preprocess_rows_per_s": round(len(ds) / prep, 1),
        "train_seconds": round(summary["train_seconds"], 2),
        "steps_per_s": round(summary["steps"] / summary["train_seconds"], 2),
        "trained_tokens": summary["trained_tokens"],
        "trained_tokens_per_s": round(summary["trained_tokens_per_second"], 1),
    }


def bench_trl(model: Path, data_rows: list[dict], folder: Path, out: Path, steps: int) -> dict:
    import datasets
    from PIL import Image
    from trl import SFTConfig, SFTTrainer

    from tuning.model import processor_from

    processor = processor_from(str(model))
    ds = datasets.Dataset.from_list(
        [
            {"messages": r["messages"], "images": [Image.open(folder / p) for p in r["images"]]}
            for r in data_rows
        ]
    )
    config = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-4,
        logging_steps=steps, save_strategy="no", report_to=[], bf16=False, use_cpu=True, max_length=None,
    )  # fmt: skip
    trainer = SFTTrainer(model=str(model), args=config, train_dataset=ds, processing_class=processor)
    trained = 0
    collate = trainer.data_collator

    def counting(features):
        nonlocal trained
        batch = collate(features)
        trained += int((batch["labels"] != -100).sum())
        return batch

    trainer.data_collator = counting
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {
        "train_seconds": round(seconds, 2),
        "steps_per_s": round(steps / seconds, 2),
        "trained_tokens": trained,
        "trained_tokens_per_s": round(trained / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", default=None, help="Write the results here too.")
    a = parser.parse_args()
    from tuning.testing.tiny_vlm import write_tiny_vlm

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = write_tiny_vlm(REAL, tmp_path / "model")
        data_rows = rows(tmp_path, a.rows)
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in data_rows))
        results = {
            "rows": a.rows,
            "steps": a.steps,
            "tuning": bench_tuning(model, data, tmp_path / "ours", a.steps),
        }
        try:
            results["trl"] = bench_trl(model, data_rows, tmp_path, tmp_path / "trl", a.steps)
        except ImportError as e:
            results["trl"] = f"not run: {e}"
    print(json.dumps(results, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
