"""Start-up: how long a command takes before it answers or trains, stage by stage (issue 30).

Two measurements, each in fresh processes, medians of ``--repeat`` runs:

1. Time to the first line: ``tuning --help``, ``tuning train --help``, a mistyped flag (the error line),
   each the first time (no flag table cached yet: tuning/flag_table.py) and later (the table cached by an
   earlier run), for this checkout and, with ``--before DIR`` (an unpacked older checkout, e.g.
   ``git archive 4ccc812 | tar -x -C /tmp/before``), for that one too, run alternately so that a busy
   machine slows both alike: compare the ratios, not the seconds.
2. Time to the first training step of a small CPU run (the tiny Llama, 8 rows), by stage: interpreter
   and imports, the parsed command line, tokenizer, model config and memory plan, data, weights,
   trainer, first step; and which optional packages were imported by then (bitsandbytes, deepspeed,
   trackers, matplotlib).

``python benchmarks/startup.py [--repeat 3] [--before DIR] [--out benchmarks/startup_results.json]``
prints a table and writes the JSON. No network, CPU only.
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
OPTIONAL = ("bitsandbytes", "deepspeed", "aim", "mlflow", "tensorboard", "matplotlib", "kernels")

FIRST_LINE = {
    "tuning --help": ["-m", "tuning.cli", "--help"],
    "tuning train --help": ["-m", "tuning.cli", "train", "--help"],
    "mistyped flag (error line)": ["-m", "tuning.sft_trainer", "--modle_name_or_path", "x"],
    "missing model folder (error line)": [
        "-m", "tuning.sft_trainer", "--model_name_or_path", "./no-such-model", "--training_data_path", "d.json",
        "--output_dir", "out",
    ],
}  # fmt: skip

# Runs in a fresh process: times each stage of `python -m tuning.sft_trainer` up to the first step.
DRIVER = r"""
import json, sys, time
OPTIONAL = json.loads(sys.argv.pop(1))
t0 = float(sys.argv[1]); marks = {"python started": time.time() - t0}
def mark(name): marks[name] = time.time() - t0
import tuning.sft_trainer as st
mark("imports (tuning.sft_trainer)")
from transformers import TrainerCallback
def timed(name, fn):
    def wrapper(*a, **k):
        out = fn(*a, **k); mark(name); return out
    return wrapper
st.load_config = timed("command line parsed", st.load_config)
st.load_encoding = timed("tokenizer (+ processor)", st.load_encoding)
st.check_memory = timed("model config + memory plan", st.check_memory)
st.build_datasets = timed("data", st.build_datasets)
st.load_model = timed("weights", st.load_model)
class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        mark("first step"); control.should_training_stop = True
        optional.extend(sorted(m for m in OPTIONAL if m in sys.modules))
optional = []
build = st.build_trainer
def build_trainer(*a, **k):
    trainer = build(*a, **k); mark("trainer"); trainer.add_callback(FirstStep()); return trainer
st.build_trainer = build_trainer
code = st.main(sys.argv[2:])
print(json.dumps({"code": code, "marks": marks, "optional_imported": optional}))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def first_line_seconds(tree: Path, args: list[str], work: Path, cache: Path) -> float:
    """Wall time from starting the process to its answer: the usage or error line. ``cache``: the
    ``$TUNING_CACHE_DIR`` it finds (empty: the first command ever)."""
    env = {**_env(), "PYTHONPATH": str(tree), "TUNING_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:  # the answer, not a library's import-time chatter before it
        if line.startswith(("usage", "error", "interrupted")):
            break
    elapsed = time.perf_counter() - start
    proc.kill()
    proc.wait()
    return elapsed


def first_step(work: Path) -> dict:
    from tuning.logs import quiet_deepspeed_detection
    from tuning.testing.tiny_model import write_tiny_model

    quiet_deepspeed_detection()
    model = write_tiny_model(work / "tiny-llama")
    rows = [{"input": f"ticket {i}", "output": "complaint" if i % 2 else "no complaint"} for i in range(8)]
    data = work / "d.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    args = [
        "--model_name_or_path", str(model), "--training_data_path", str(data), "--output_dir", str(work / "out"),
        "--max_steps", "2", "--save_strategy", "no", "--per_device_train_batch_size", "4",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(OPTIONAL), repr(time.time()), *args],
        cwd=work,
        env={**_env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"the timed run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", type=Path, default=None, help="an older checkout to compare with")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "startup_results.json")
    args = parser.parse_args()
    trees = {"this checkout": REPO, **({"before": args.before} if args.before else {})}
    results: dict = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "first_line_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"{'time to the first line (median s)':<52}" + "".join(f"{t:>16}" for t in trees) + "   ratio")
        caches = {t: work / f"cache-{i}" for i, t in enumerate(trees)}  # kept: "later"
        for (name, cmd), cold in [(item, cold) for item in FIRST_LINE.items() for cold in (True, False)]:
            name = f"{name}, {'first time' if cold else 'later'}"
            samples: dict[str, list[float]] = {t: [] for t in trees}
            for i in range(args.repeat):
                for tree_name, tree in trees.items():  # alternately: a busy machine slows both alike
                    cache = work / f"cold-{tree_name}-{name}-{i}" if cold else caches[tree_name]
                    if not cold and i == 0:
                        first_line_seconds(tree, cmd, work, cache)  # an earlier run caches the table
                    samples[tree_name].append(first_line_seconds(tree, cmd, work, cache))
            medians = {t: statistics.median(s) for t, s in samples.items()}
            results["first_line_s"][name] = medians
            ratio = f"{medians['before'] / medians['this checkout']:.1f}x" if "before" in medians else ""
            print(f"{name:<52}" + "".join(f"{medians[t]:>16.2f}" for t in trees) + f"   {ratio}")
        runs = [first_step(work / f"run{i}") for i in range(args.repeat)]
    stages = list(runs[0]["marks"])
    results["first_step_s"] = {s: statistics.median(r["marks"][s] for r in runs) for s in stages}
    results["optional_imported_by_first_step"] = runs[0]["optional_imported"]
    print(f"\n{'time to the first step (median s, cumulative)':<46}{'s':>8}{'stage':>8}")
    previous = 0.0
    for stage, at in results["first_step_s"].items():
        print(f"{stage:<46}{at:>8.2f}{at - previous:>8.2f}")
        previous = at
    print(
        f"optional packages imported by the first step: {', '.join(runs[0]['optional_imported']) or 'none'}"
    )
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
