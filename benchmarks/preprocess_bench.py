"""Preprocessing benchmark: chat rows → input_ids + assistant-only labels through a data config.

    python benchmarks/preprocess_bench.py [--rows 100000] [--tokenizer DIR] [--out benchmarks/preprocess_results.json]

Writes ``--rows`` synthetic multi-turn chat rows (system + 2 user/assistant exchanges) to a temporary
JSON-lines file and runs the data-config pipeline (``tokenize_and_apply_chat_template_with_masking``,
then truncation/drop counting) in these settings, each with a fresh ``datasets`` cache:

- ``prefix template, 1 proc``: a template without ``{% generation %}`` (prefix rendering);
- ``generation template, 1 proc``: the same template with ``{% generation %}`` markers;
- ``prefix template, 2 procs``: ``num_proc: 2`` in the handler's arguments;
- ``prefix template, cached rerun``: the first setting again on its warm cache (what a resume costs).

Prints a markdown table of rows/s and writes JSON. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKENIZER = "/work/shared/peer-data/fms-hf-tuning/tinyllama-tokenizer"
PREFIX_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = [
    "the",
    "a",
    "model",
    "data",
    "train",
    "token",
    "mask",
    "chat",
    "turn",
    "user",
    "answer",
    "question",
    "short",
    "long",
    "text",
    "value",
]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            messages = [{"role": "system", "content": sentence(rng, 8)}]
            for _ in range(2):
                messages.append({"role": "user", "content": sentence(rng, rng.randint(5, 30))})
                messages.append({"role": "assistant", "content": sentence(rng, rng.randint(5, 60))})
            f.write(json.dumps({"messages": messages}) + "\n")


def config_text(data: Path, template: str, num_proc: int) -> str:
    arguments = {"remove_columns": "all", **({"num_proc": num_proc} if num_proc > 1 else {})}
    return json.dumps(
        {
            "dataprocessor": {"type": "default", "chat_template": template},
            "datasets": [
                {
                    "name": "chat",
                    "data_paths": [str(data)],
                    "data_handlers": [
                        {
                            "name": "tokenize_and_apply_chat_template_with_masking",
                            "arguments": arguments,
                        }
                    ],
                }
            ],
        }
    )


def run_setting(
    work: Path, data: Path, tokenizer_dir: str, template: str, num_proc: int, cache: Path
) -> dict:
    import datasets
    from transformers import AutoTokenizer

    from tuning.config.args import DataArgs
    from tuning.data.mixing import build_from_data_config

    datasets.config.HF_DATASETS_CACHE = cache
    config = work / f"config-{abs(hash((template, num_proc, str(cache))))}.json"
    config.write_text(config_text(data, template, num_proc))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # load_dataset caches under HF_DATASETS_CACHE too: load once outside the timing
    datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))
    start = time.perf_counter()
    prepared = build_from_data_config(DataArgs(data_config_path=str(config)), tokenizer, 4096)
    seconds = time.perf_counter() - start
    return {
        "rows": prepared.stats.rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(prepared.stats.rows / seconds),
        "tokens": prepared.stats.total_tokens,
        "trained_tokens": prepared.stats.trained_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tokenizer", default=TOKENIZER)
    parser.add_argument("--out", default=str(Path(__file__).parent / "preprocess_results.json"))
    opts = parser.parse_args()
    prefix = PREFIX_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "chat.jsonl"
        write_rows(data, opts.rows)
        results = {}
        settings = [
            ("prefix template, 1 proc", prefix, 1, "c1"),
            ("generation template, 1 proc", PREFIX_TEMPLATE, 1, "c2"),
            ("prefix template, 2 procs", prefix, 2, "c3"),
            ("prefix template, cached rerun", prefix, 1, "c1"),
        ]
        for name, template, procs, cache in settings:
            results[name] = run_setting(work, data, opts.tokenizer, template, procs, work / cache)
            print(f"{name}: {results[name]}", file=sys.stderr)
    print(
        f"\n{opts.rows} chat rows (system + 2 exchanges), tokenizer {opts.tokenizer}, {os.cpu_count()} CPUs\n"
    )
    print("| setting | seconds | rows/s | tokens | trained tokens |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']} | {r['rows_per_s']} | {r['tokens']} | {r['trained_tokens']} |")
    Path(opts.out).write_text(json.dumps({"rows": opts.rows, "results": results}, indent=1) + "\n")
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
