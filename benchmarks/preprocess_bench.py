"""Preprocessing benchmark: chat rows → input_ids + labels, rows/s per setting, optionally against an
earlier checkout of the code in alternating pairs (for a before/after table on a shared machine).

    python benchmarks/preprocess_bench.py [--before DIR] [--reps 2] [--rows 5000] [--fms_repeat 1000]
        [--turn_rows 300] [--settings NAME ...] [--out benchmarks/preprocess_results.json]

Settings (each in its own process with a fresh ``datasets`` cache; ``--settings`` picks some):

- ``2-exchange, prefix template, data config``: ``--rows`` synthetic rows (system + 2 user/assistant
  exchanges), the handler ``tokenize_and_apply_chat_template_with_masking``, a template without
  ``{% generation %}`` (TinyLlama tokenizer); ``... generation template ...`` the same with the markers;
  ``... 2 procs`` with ``num_proc: 2`` (its CPU rate counts the main process only); ``... cached rerun``
  the first setting again on its warm cache (what a resume costs);
- ``fms multi-turn, data config`` / ``fms multi-turn, data file``: the reference tool's
  ``multi_turn_chat.jsonl`` (10 rows) repeated ``--fms_repeat`` times, with its Granite 3.1 chat template
  (``mt_data_granite_3_1B_tokenize_and_mask_handler.yaml``) through a data config, and through
  ``--training_data_path`` + ``--chat_template``;
- ``20-turn, <family>, data file``: ``--turn_rows`` synthetic conversations of a system prompt and 20
  exchanges through ``--training_data_path`` with the real Llama 3.2 (prefix-stable: one sample per
  row) and Qwen3 (every turn its own sample) tokenizers; ``20-turn, qwen3, render budget 50000``
  with ``--chat_render_budget 50000`` (about half of each conversation's turns).

Each result also has ``cpu_seconds`` and, for code with the data audit, ``audit_report_seconds`` (its
document, log table and page, after preprocessing; the audit's counters are inside the timed part).

``--before DIR`` runs every setting with the ``tuning`` package of ``DIR`` too (e.g. ``git archive
main | tar -x -C DIR``), alternating before/after ``--reps`` times; medians are reported. Prints a
markdown table and writes JSON. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
TINYLLAMA = SHARED / "peer-data" / "fms-hf-tuning" / "tinyllama-tokenizer"
FMS_DATA = SHARED / "peer-data" / "fms-hf-tuning" / "testdata" / "jsonl" / "multi_turn_chat.jsonl"
GRANITE = (
    SHARED / "peer-data" / "fms-hf-tuning" / "predefined_data_configs" / "granite_3_1b_chat_template.txt"
)
REAL = SHARED / "real-tokenizers"
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PREFIX_TEMPLATE = GENERATION_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
WORDS = ["the", "a", "model", "data", "train", "token", "mask", "chat", "turn", "user", "answer", "question"]

# name → (path: data config | data file, data: 2-exchange | fms | 20-turn, tokenizer, template, extra)
SETTINGS: dict[str, dict] = {
    "2-exchange, prefix template, data config": dict(
        path="config", data="2x", tok=TINYLLAMA, tpl=PREFIX_TEMPLATE
    ),
    "2-exchange, generation template, data config": dict(
        path="config", data="2x", tok=TINYLLAMA, tpl=GENERATION_TEMPLATE
    ),
    "2-exchange, prefix template, data config, 2 procs": dict(
        path="config", data="2x", tok=TINYLLAMA, tpl=PREFIX_TEMPLATE, procs=2
    ),
    "2-exchange, prefix template, data config, cached rerun": dict(
        path="config", data="2x", tok=TINYLLAMA, tpl=PREFIX_TEMPLATE, rerun=True
    ),
    "fms multi-turn, data config": dict(path="config", data="fms", tok=TINYLLAMA, tpl="granite"),
    "fms multi-turn, data file": dict(path="file", data="fms", tok=TINYLLAMA, tpl="granite"),
    "20-turn, llama3.2, data file": dict(path="file", data="20", tok=REAL / "llama3.2", tpl=None),
    "20-turn, qwen3, data file": dict(path="file", data="20", tok=REAL / "qwen3", tpl=None),
    "20-turn, qwen3, render budget 50000": dict(
        path="file", data="20", tok=REAL / "qwen3", tpl=None, budget=50_000
    ),
}


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_rows(path: Path, kind: str, opts: argparse.Namespace, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        if kind == "fms":
            lines = [line for line in FMS_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
            for _ in range(opts.fms_repeat):
                f.write("\n".join(lines) + "\n")
            return
        rows, exchanges = (opts.rows, 2) if kind == "2x" else (opts.turn_rows, 20)
        for _ in range(rows):
            messages = [{"role": "system", "content": sentence(rng, 8)}]
            for _ in range(exchanges):
                messages.append({"role": "user", "content": sentence(rng, rng.randint(5, 30))})
                messages.append({"role": "assistant", "content": sentence(rng, rng.randint(5, 60))})
            f.write(json.dumps({"messages": messages}) + "\n")


def config_text(data: Path, template: str, num_proc: int) -> str:
    arguments = {"remove_columns": "all", **({"num_proc": num_proc} if num_proc > 1 else {})}
    handler = {"name": "tokenize_and_apply_chat_template_with_masking", "arguments": arguments}
    return json.dumps(
        {
            "dataprocessor": {"type": "default", "chat_template": template},
            "datasets": [{"name": "chat", "data_paths": [str(data)], "data_handlers": [handler]}],
        }
    )


def worker(opts: argparse.Namespace) -> dict:
    """One setting with the ``tuning`` package of ``opts.repo``, timed; returns its counts."""
    sys.path.insert(0, str(Path(opts.repo).resolve()))
    import datasets
    from transformers import AutoTokenizer

    import tuning
    from tuning.config.args import DataArgs

    setting = SETTINGS[opts.setting]
    work = Path(opts.work)
    datasets.config.HF_DATASETS_CACHE = work / "cache"
    data = work / "data.jsonl"
    template = setting["tpl"]
    if template == "granite":
        template = GRANITE.read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(setting["tok"])
    if template:
        tokenizer.chat_template = template
    extra = {"chat_render_budget": setting["budget"]} if "budget" in setting else {}
    try:
        stop = _stop_ids(setting["tok"], tokenizer)
        if setting["path"] == "config":
            from tuning.data.mixing import build_from_data_config

            config = work / "data.json"
            config.write_text(config_text(data, template, setting.get("procs", 1)))
            args = DataArgs(data_config_path=str(config), **extra)
            load = _with_stop_ids(build_from_data_config, args, tokenizer, stop)
        else:
            from tuning.data.pipeline import build_datasets

            args = DataArgs(training_data_path=str(data), chat_template=template, **extra)
            load = _with_stop_ids(build_datasets, args, tokenizer, stop, by_ids=True)
        datasets.load_dataset("json", data_files=str(data), split="train")  # its cache: outside the timing
        if setting.get("rerun"):  # what a rerun or a resume pays: the processed data is in the cache
            load()
        start, cpu = time.perf_counter(), time.process_time()
        prepared = load()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        report = _audit_report_seconds(prepared, args, tokenizer)
    except Exception as e:  # the old code refuses some templates: report it as the result
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", "code": tuning.__file__}
    return {
        "rows": prepared.stats.rows,
        "samples": len(prepared.train),
        "seconds": round(seconds, 3),
        "rows_per_s": round(prepared.stats.rows / seconds, 1),
        # this process's CPU time: steadier than wall time when other jobs share the cores
        "rows_per_cpu_s": round(prepared.stats.rows / cpu, 1),
        "tokens": prepared.stats.total_tokens,
        "trained_tokens": prepared.stats.trained_tokens,
        "cpu_seconds": round(cpu, 3),
        "audit_report_seconds": report,
    }


def _audit_report_seconds(prepared, args, tokenizer) -> float | None:
    """What the audit adds after preprocessing (code with an audit): the document, its table and the
    page. The counters themselves are part of the timed preprocessing (compare with ``--before``)."""
    try:
        from tuning.data import audit_table, data_audit
        from tuning.outputs.audit_report import render_page
    except ImportError:
        return None
    start = time.process_time()
    audit = data_audit(prepared, args, 4096, 1.0)
    audit_table(audit)
    render_page(audit, {s.name: s.stats.examples for s in prepared.sources}, tokenizer)
    return round(time.process_time() - start, 4)


def _stop_ids(folder: Path, tokenizer) -> tuple[int, ...]:
    try:
        from transformers import AutoConfig

        from tuning.config.args import ModelArgs
        from tuning.model import generation_stop_ids
    except ImportError:  # the code before stop tokens existed
        return ()
    return generation_stop_ids(
        ModelArgs(model_name_or_path=str(folder)), AutoConfig.from_pretrained(folder), tokenizer
    )


def _with_stop_ids(fn, args, tokenizer, stop, by_ids: bool = False):
    import inspect

    params = inspect.signature(fn).parameters
    if by_ids and "stop_token_ids" in params:
        return lambda: fn(args, tokenizer, 4096, stop)
    if not by_ids and "ctx" in params:  # one encoding context in place of the loose arguments
        from tuning.data.prepare import encoding_context

        return lambda: fn(encoding_context(args, tokenizer, 4096, stop))
    if not by_ids and "settings" in params:
        from tuning.data.chat import settings_from_args

        return lambda: fn(args, tokenizer, 4096, settings_from_args(args, stop))
    return lambda: fn(args, tokenizer, 4096)


def run_one(opts: argparse.Namespace, name: str, repo: Path, data: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "data.jsonl").symlink_to(data)
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--repo",
            str(repo),
            "--setting",
            name,
            "--work",
            str(work),
        ]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(repo),
        }
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1][:200]}
        return json.loads(done.stdout.strip().splitlines()[-1])


def median(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    out = dict(ok[0])
    out["rows_per_s"] = round(statistics.median(r["rows_per_s"] for r in ok), 1)
    out["rows_per_cpu_s"] = round(statistics.median(r["rows_per_cpu_s"] for r in ok), 1)
    out["seconds"] = round(statistics.median(r["seconds"] for r in ok), 3)
    return out


def cell(r: dict | None, key: str) -> str:
    if r is None:
        return "–"
    return f"fails ({r['error'][:60]})" if "error" in r else f"{r[key]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--fms_repeat", type=int, default=1000)
    parser.add_argument("--turn_rows", type=int, default=300)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--before", default=None, help="a checkout whose tuning package is the 'before'")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "preprocess_results.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repo", default=str(REPO), help=argparse.SUPPRESS)
    parser.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        print(json.dumps(worker(opts)))
        return
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for kind in ("2x", "fms", "20"):
            files[kind] = Path(tmp) / f"{kind}.jsonl"
            write_rows(files[kind], kind, opts)
        for name in opts.settings:
            data = files[SETTINGS[name]["data"]]
            runs: dict[str, list] = {"before": [], "after": []}
            for _ in range(opts.reps):  # alternating pairs: the machine's load hits both alike
                if opts.before:
                    runs["before"].append(run_one(opts, name, Path(opts.before), data))
                runs["after"].append(run_one(opts, name, REPO, data))
            results[name] = {k: median(v) for k, v in runs.items() if v} | {"runs": runs}
            print(f"{name}: {results[name]['after']}", file=sys.stderr)
    print(
        f"\nrows: 2-exchange {opts.rows}, fms {opts.fms_repeat} x 10, 20-turn {opts.turn_rows}; {os.cpu_count()} CPUs\n"
    )
    print(
        "| setting | rows | samples | rows/s before | rows/s after | rows/CPU-s before | rows/CPU-s after "
        "| after/before (CPU) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        after, before = r["after"], r.get("before")
        ratio = ""
        if before and "error" not in before and "error" not in after:
            ratio = f"{after['rows_per_cpu_s'] / before['rows_per_cpu_s']:.2f}x"
        rows, samples = after.get("rows", ""), after.get("samples", "")
        print(
            f"| {name} | {rows} | {samples} | {cell(before, 'rows_per_s')} | {cell(after, 'rows_per_s')} "
            f"| {cell(before, 'rows_per_cpu_s')} | {cell(after, 'rows_per_cpu_s')} | {ratio} |"
        )
    Path(opts.out).write_text(json.dumps({"options": vars(opts), "results": results}, indent=1) + "\n")
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
