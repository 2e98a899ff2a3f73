"""Memory modes on CPU: peak memory and final loss of the same job in float32 master weights, the lean
default (Kahan-compensated bf16) and pure bf16, plus LoRA and QLoRA, each beside the memory plan's
prediction.

    python benchmarks/memory_benchmark.py [--steps 200] [--out benchmarks/memory_results.json]
    python benchmarks/memory_benchmark.py --quick        # 5 steps per mode: the memory columns
    python benchmarks/memory_benchmark.py --fsdp_loss --seq_len 2048 --steps 3   # label_only vs standard
    python benchmarks/memory_benchmark.py --one_process --seq_len 2048 --steps 3   # ours vs TRL 1.16
    python benchmarks/memory_benchmark.py --plan_vs_measured   # the plan's activations + logits vs RSS

Every mode runs the real CLI in its own process (so the peak is that run's): a random Llama (hidden
256, 4 layers, intermediate 688) with the 32k TinyLlama vocabulary, AdamW at lr 1e-5, seed 42, rows of
256 tokens, all trained. "measured" is the process's peak resident memory minus its resident memory
just before the model loads (tokenizer, data and libraries are already in); "plan" is the memory plan's
peak for that run, printed before the model loads. Loss numbers are exact on any machine; the memory
modes report no timings (the development machine is shared); --fsdp_loss and --one_process report
seconds per step of runs made side by side, so compare them only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKENIZER = Path(__file__).resolve().parents[2] / "shared/peer-data/fms-hf-tuning/tinyllama-tokenizer"
MODES = {
    # name: (flags, what it is)
    "float32 master": (["--master_weights", "float32"], "float32 weights + AdamW state, bf16 autocast"),
    "kahan (default)": ([], "bf16 weights + AdamW state, Kahan-compensated updates"),
    "pure bf16": (["--master_weights", "half"], "bf16 weights + AdamW state, plain updates"),
    "kahan + checkpointing": (
        ["--gradient_checkpointing", "True"],
        "as kahan, layers recomputed in backward",
    ),
    "LoRA r=16": (["--peft_method", "lora", "--lora_r", "16", "--target_modules", "all-linear"], "bf16 base"),
    "QLoRA r=16": (
        ["--peft_method", "lora", "--lora_r", "16", "--target_modules", "all-linear", "--load_in_4bit"],
        "NF4 double-quantized base",
    ),
}
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "ri", "mo", "lu", "ze", "fa", "no"]


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_inputs(root: Path, tokenizer_dir: Path, seq_len: int) -> tuple[Path, Path]:
    """A random Llama on the TinyLlama tokenizer, and rows of about ``seq_len`` tokens of text."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_dir = root / "model"
    torch.manual_seed(42)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    rows = [
        {"text": " ".join("".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(seq_len))}
        for _ in range(64)
    ]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return model_dir, data


def tensor_peak(profiler) -> int:
    """The most tensor memory allocated at once since the profiler started (its "Total Allocated"):
    on CPU what ``torch.cuda.max_memory_allocated`` is on a GPU, without allocator and library overhead."""
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        profiler.export_chrome_trace(trace.name)
        events = json.loads(Path(trace.name).read_text())["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def child(spec: dict) -> None:
    """One run of the CLI in this process; prints one JSON line with the measurements."""
    import torch

    from tuning import sft_trainer
    from tuning.train import read_training_logs

    seen: dict = {}
    real_load, real_check = sft_trainer.load_model, sft_trainer.check_memory
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)

    def load_model(*args, **kwargs):
        seen["baseline"] = rss_now()
        if spec["profile"]:
            profiler.start()  # from here on it records every tensor allocation and free
        return real_load(*args, **kwargs)

    def check_memory(setup, mode, show=True):
        plan = real_check(setup, mode, show)
        seen["plan"] = plan.__dict__ if plan else None
        return plan

    sft_trainer.load_model, sft_trainer.check_memory = load_model, check_memory
    code = sft_trainer.main(spec["argv"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if spec["profile"]:
        profiler.stop()
        seen["tensor_peak"] = tensor_peak(profiler)
    losses = [r["value"] for r in read_training_logs(spec["argv"][spec["argv"].index("--output_dir") + 1])]
    print("RESULT " + json.dumps({"code": code, "peak": peak, "losses": losses, **seen}), flush=True)


def run_mode(name: str, model_dir: Path, data: Path, root: Path, steps: int, seq_len: int) -> dict:
    """The mode's run (losses, resident memory), then 3 steps under torch's memory profiler (tensor peak:
    the profiler's own records would inflate the resident memory of the first)."""
    measured = run_child(name, model_dir, data, root, steps, seq_len, profile=False)
    profiled = run_child(name, model_dir, data, root, 3, seq_len, profile=True)
    measured["tensor_peak"] = profiled["tensor_peak"]
    return measured


def run_child(
    name: str, model_dir: Path, data: Path, root: Path, steps: int, seq_len: int, profile: bool
) -> dict:
    flags, _ = MODES[name]
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    out = root / f"{slug}-{'profiled' if profile else 'run'}"
    argv = [
        *(
            "--model_name_or_path",
            str(model_dir),
            "--training_data_path",
            str(data),
            "--output_dir",
            str(out),
        ),
        *("--dataset_text_field", "text", "--max_seq_length", str(seq_len), "--packing", "True"),
        *("--per_device_train_batch_size", "4", "--max_steps", str(steps), "--learning_rate", "1e-5"),
        *("--lr_scheduler_type", "constant", "--warmup_steps", "0", "--weight_decay", "0.0", "--seed", "42"),
        *("--save_strategy", "no", "--logging_strategy", "steps", "--logging_steps", "1"),
        *("--use_flash_attn", "false", "--torch_dtype", "bfloat16", *flags),
    ]
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps({"argv": argv, "profile": profile})],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(line.removeprefix("RESULT "))
    measured["mode"] = name
    return measured


def table(results: list[dict]) -> str:
    mib = 2**20
    lines = [
        "| mode | weights in memory | plan (MiB) | tensor peak (MiB) | plan / tensor peak | RSS growth (MiB) "
        "| plan / RSS growth | first loss | final loss |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        grown, tensors = (r["peak"] - r["baseline"]) / mib, r["tensor_peak"] / mib
        plan = r["plan"]["total"] / mib if r.get("plan") else float("nan")
        lines.append(
            f"| {r['mode']} | {MODES[r['mode']][1]} | {plan:.0f} | {tensors:.0f} | {plan / tensors:.2f} | "
            f"{grown:.0f} | {plan / grown:.2f} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} |"
        )
    return "\n".join(lines)


# --- label-only vs standard loss under 2-process FSDP (issue 25) ---

FSDP_CONFIG = Path(__file__).resolve().parent.parent / "fixtures" / "accelerate_fsdp_defaults.yaml"


def write_wide_vocab_inputs(
    root: Path, vocab: int, hidden: int, seq_len: int, trained: int, count: int = 16
) -> tuple[Path, Path]:
    """A random 2-layer Llama with a ``vocab``-entry head, and pretokenized rows of ``seq_len`` tokens of
    which the last ``trained`` carry labels (a long prompt, a shorter completion)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuning.testing.tiny_model import build_tokenizer

    model_dir = root / "wide"
    torch.manual_seed(42)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=seq_len,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)  # only for loading: the rows are already token ids
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        ids = [1, *(rng.randrange(3, vocab) for _ in range(seq_len - 1))]
        rows.append({"input_ids": ids, "labels": [-100] * (seq_len - trained) + ids[seq_len - trained :]})
    data = root / "wide.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return model_dir, data


def rank_child(argv: list[str]) -> None:
    """One rank of a launched run: the CLI, then one line with this rank's resident-memory growth from just
    before the model loads to its peak, and the plan's peak."""
    from tuning import sft_trainer

    seen: dict = {}
    real_load, real_check = sft_trainer.load_model, sft_trainer.check_memory

    def load_model(*args, **kwargs):
        seen["baseline"] = rss_now()
        return real_load(*args, **kwargs)

    def check_memory(setup, mode, show=True):
        plan = real_check(setup, mode, show)
        seen["plan"] = plan.total if plan else None
        return plan

    sft_trainer.load_model, sft_trainer.check_memory = load_model, check_memory
    code = sft_trainer.main(argv)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rank = os.environ.get("RANK", "0")
    print(f"RANKRESULT {json.dumps({'rank': rank, 'code': code, 'peak': peak, **seen})}", flush=True)


def fsdp_loss_comparison(args: argparse.Namespace) -> list[dict]:
    """label_only and standard side by side, 2 processes under the shipped FSDP config, same rows."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = write_wide_vocab_inputs(root, args.vocab, args.hidden, args.seq_len, args.trained)
        for loss in ("label_only", "standard"):
            out = root / loss
            argv = ["--model_name_or_path", str(model_dir), "--training_data_path", str(data)]
            argv += ["--output_dir", str(out), "--torch_dtype", "float32", "--max_steps", str(args.steps)]
            argv += ["--per_device_train_batch_size", "1", "--save_strategy", "no", "--logging_steps", "1"]
            argv += ["--max_seq_length", str(args.seq_len), "--loss_implementation", loss]
            argv += ["--padding_free", "false", "--memory_check", "warn"]
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
            launch += ["--num_processes", "2", "--main_process_port", str(29500 + random.randrange(1000))]
            result = subprocess.run(
                [*launch, __file__, "--rank_child", json.dumps(argv)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            )
            ranks = [
                json.loads(ln.removeprefix("RANKRESULT "))
                for ln in result.stdout.splitlines()
                if ln.startswith("RANKRESULT ")
            ]
            if result.returncode != 0 or len(ranks) != 2:
                raise SystemExit(f"{loss} failed:\n{result.stderr[-3000:]}")
            summary = json.loads((out / "run_summary.json").read_text())
            rows.append(
                {
                    "loss": loss,
                    "ranks": ranks,
                    "seconds_per_step": summary["train_seconds"] / summary["steps"],
                    "losses": [r["value"] for r in _logs(out)],
                }
            )
    return rows


def _logs(out: Path) -> list[dict]:
    from tuning.train import read_training_logs

    return read_training_logs(out)


def fsdp_table(rows: list[dict]) -> str:
    mib = 2**20
    lines = [
        "| loss | RSS growth rank 0 / 1 (MiB) | plan peak (MiB) | plan / measured (rank 0) | s/step | losses |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        grown = [(k["peak"] - k["baseline"]) / mib for k in r["ranks"]]
        plan = (r["ranks"][0].get("plan") or 0) / mib
        lines.append(
            f"| {r['loss']} | {grown[0]:.0f} / {grown[1]:.0f} | {plan:.0f} | {plan / grown[0]:.2f} | "
            f"{r['seconds_per_step']:.2f} | {', '.join(f'{v:.4f}' for v in r['losses'])} |"
        )
    label_only, standard = rows
    ratio = max(k["peak"] - k["baseline"] for k in label_only["ranks"]) / max(
        k["peak"] - k["baseline"] for k in standard["ranks"]
    )
    lines.append(
        f"\nlabel_only / standard: RSS growth {ratio:.2f}x, "
        f"time per step {label_only['seconds_per_step'] / standard['seconds_per_step']:.2f}x"
    )
    return "\n".join(lines)


# --- one process: ours (label-only, standard) vs TRL 1.16's SFTTrainer on the same rows (issue 25) ---

TRL_PYTHON = "/tmp/trlvenv/bin/python"  # a throwaway venv: TRL never enters the project's environment


def _one_process_argv(
    model_dir: Path, data: Path, out: Path, args: argparse.Namespace, loss: str
) -> list[str]:
    """Our CLI's flags for the --one_process runs; the TRL run mirrors each of them (trl_child)."""
    argv = ["--model_name_or_path", str(model_dir), "--training_data_path", str(data)]
    argv += ["--output_dir", str(out), "--torch_dtype", "float32", "--max_steps", str(args.steps)]
    argv += ["--per_device_train_batch_size", "1", "--save_strategy", "no", "--logging_steps", "1"]
    argv += ["--max_seq_length", str(args.seq_len), "--loss_implementation", loss, "--memory_check", "warn"]
    argv += ["--learning_rate", "1e-5", "--lr_scheduler_type", "constant", "--warmup_steps", "0"]
    return argv + ["--weight_decay", "0.0", "--seed", "42", "--optim", "adamw_torch_fused"]


def trl_child(spec: dict) -> None:
    """TRL's SFTTrainer with its default loss on the rows ours trains on: the same token ids, and a
    completion mask that is 1 exactly where our labels are not -100 (TRL turns the rest into -100)."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer  # imported before the baseline, as ours is (TRL imports lazily)

    rows = [json.loads(ln) for ln in Path(spec["data"]).read_text(encoding="utf-8").splitlines()]
    dataset = Dataset.from_list(
        [
            {"input_ids": r["input_ids"], "completion_mask": [int(v != -100) for v in r["labels"]]}
            for r in rows
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    baseline = rss_now()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    config = SFTConfig(
        output_dir=spec["out"],
        max_length=spec["seq_len"],
        # a pretokenized row has no prompt/completion keys, so TRL would train every token unless told
        completion_only_loss=True,
        per_device_train_batch_size=1,
        max_steps=spec["steps"],
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        seed=42,
        optim="adamw_torch_fused",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        **spec["extra"],
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    seconds = result.metrics["train_runtime"] / spec["steps"]
    out = {
        "trl": trl.__version__,
        "peak": peak,
        "baseline": baseline,
        "losses": losses,
        "seconds_per_step": seconds,
    }
    print("RANKRESULT " + json.dumps(out), flush=True)


def one_process_run(
    path: str, model_dir: Path, data: Path, root: Path, args: argparse.Namespace, rep: int
) -> dict:
    out = root / f"{path}-{rep}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    if path.startswith("ours-"):
        argv = _one_process_argv(model_dir, data, out, args, path.removeprefix("ours-"))
        command = [sys.executable, __file__, "--rank_child", json.dumps(argv)]
    else:
        spec = {"model": str(model_dir), "data": str(data), "out": str(out), "seq_len": args.seq_len}
        spec |= {"steps": args.steps, "extra": {}}
        command = [TRL_PYTHON, __file__, "--trl_child", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("RANKRESULT ")), None)
    if result.returncode != 0 or line is None:
        raise SystemExit(f"{path} failed:\n{result.stderr[-3000:]}")
    measured = json.loads(line.removeprefix("RANKRESULT "))
    if measured.get("code", 0) != 0:  # the CLI stopped with its one-line error (out of memory, say)
        raise SystemExit(f"{path} exited {measured['code']}:\n{result.stderr[-3000:]}")
    if path.startswith("ours-"):
        summary = json.loads((out / "run_summary.json").read_text())
        measured["seconds_per_step"] = summary["train_seconds"] / summary["steps"]
        measured["losses"] = [r["value"] for r in _logs(out)]
    return {"path": path, "rep": rep, **measured}


def one_process_comparison(args: argparse.Namespace) -> list[dict]:
    """Each path once per repetition, the order reversed on odd repetitions (a, b, then b, a), so that a
    change in the machine's other load falls on both sides."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # One row, trained once per step: both trainers shuffle with their own samplers, so with several rows
        # they would see them in different orders and their losses could not be compared step by step
        model_dir, data = write_wide_vocab_inputs(
            root, args.vocab, args.hidden, args.seq_len, args.trained, 1
        )
        for rep in range(args.reps):
            for path in args.paths if rep % 2 == 0 else args.paths[::-1]:
                runs.append(one_process_run(path, model_dir, data, root, args, rep))
                print(f"done {path} rep {rep}", file=sys.stderr, flush=True)
    return runs


def one_process_table(runs: list[dict]) -> str:
    """Medians over repetitions per path, and each path's ratios to the first path's."""
    import statistics

    mib = 2**20
    paths = list(dict.fromkeys(r["path"] for r in runs))
    med = {
        p: {
            "grown": statistics.median((r["peak"] - r["baseline"]) / mib for r in runs if r["path"] == p),
            "s": statistics.median(r["seconds_per_step"] for r in runs if r["path"] == p),
            "losses": next(r["losses"] for r in runs if r["path"] == p),
            "plan": next((r.get("plan") or float("nan")) / mib for r in runs if r["path"] == p),
            "each": [
                f"{(r['peak'] - r['baseline']) / mib:.0f} MiB, {r['seconds_per_step']:.1f} s"
                for r in runs
                if r["path"] == p
            ],
        }
        for p in paths
    }
    first = med[paths[0]]
    lines = [
        f"| path | RSS growth (MiB) | s/step | RSS vs {paths[0]} | time vs {paths[0]} | plan peak (MiB) "
        "| plan / measured | per-step losses | each run (RSS growth, s/step) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for p in paths:
        m = med[p]
        lines.append(
            f"| {p} | {m['grown']:.0f} | {m['s']:.1f} | {m['grown'] / first['grown']:.2f}x "
            f"| {m['s'] / first['s']:.2f}x | {m['plan']:.0f} | {m['plan'] / m['grown']:.2f} | {', '.join(f'{v:.4f}' for v in m['losses'])} | {'; '.join(m['each'])} |"
        )
    return "\n".join(lines)


def plan_vs_measured() -> list[dict]:
    """The plan's activation and logits terms against the peak RSS growth of one forward + backward,
    for the shapes tests/test_memory.py checks (tests/peak_memory.py; docs/memory.md)."""
    from tests.peak_memory import SHAPES, measure_in_subprocess, planned

    rows = []
    for shape, measured in zip(SHAPES, measure_in_subprocess(SHAPES), strict=True):
        rows.append({"shape": shape, **planned(shape), "measured": measured["grown"]})
    return rows


def plan_vs_measured_table(rows: list[dict]) -> str:
    mib = 2**20
    lines = [
        "| shape (hidden, layers, vocab) | tokens | loss | activations (plan) | logits (plan) | plan | measured "
        "| plan / measured |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        c, s = r["shape"]["config"], r["shape"]
        lines.append(
            f"| {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['vocab_size']} vocab "
            f"| {s['batch']} × {s['seq']} | {s['loss']} | {r['activations'] / mib:.1f} MiB "
            f"| {r['logits'] / mib:.1f} MiB | {r['working'] / mib:.1f} MiB | {r['measured'] / mib:.1f} MiB "
            f"| {r['working'] / r['measured']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="5 steps per mode: the memory columns")
    parser.add_argument("--tokenizer", default=str(TOKENIZER))
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "memory_results.json"))
    parser.add_argument("--rank_child", help=argparse.SUPPRESS)
    parser.add_argument("--trl_child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--fsdp_loss",
        action="store_true",
        help="label_only vs standard loss, 2 processes under FSDP on CPU, a wide-vocabulary model",
    )
    parser.add_argument(
        "--plan_vs_measured",
        action="store_true",
        help="the plan's activations + logits against measured peak RSS growth, 3 float32 shapes",
    )
    parser.add_argument(
        "--one_process",
        action="store_true",
        help="one process, the --fsdp_loss model and rows: ours (label_only / standard) vs TRL's SFTTrainer",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["ours-label_only", "trl-default"],
        choices=["ours-label_only", "ours-standard", "trl-default"],
        help=f"--one_process: what to run (trl-default needs TRL installed in {TRL_PYTHON}'s venv)",
    )
    parser.add_argument("--reps", type=int, default=2, help="--one_process: runs per path, order alternating")
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--trained", type=int, default=512, help="--fsdp_loss: trained tokens per row")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.rank_child:
        rank_child(json.loads(args.rank_child))
        return
    if args.trl_child:
        trl_child(json.loads(args.trl_child))
        return
    if args.one_process:
        runs = one_process_comparison(args)
        print(one_process_table(runs))
        Path(args.out).with_name(f"memory_one_process_{args.seq_len}.json").write_text(
            json.dumps({"args": vars(args), "results": runs}, indent=1) + "\n", encoding="utf-8"
        )
        return
    if args.plan_vs_measured:
        rows = plan_vs_measured()
        print(plan_vs_measured_table(rows))
        Path(args.out).with_name("memory_plan_vs_measured.json").write_text(
            json.dumps(rows, indent=1) + "\n", encoding="utf-8"
        )
        return
    if args.fsdp_loss:
        rows = fsdp_loss_comparison(args)
        print(fsdp_table(rows))
        Path(args.out).with_name("memory_fsdp_loss.json").write_text(
            json.dumps({"args": vars(args), "results": rows}, indent=1) + "\n", encoding="utf-8"
        )
        return
    steps = 5 if args.quick else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = write_inputs(root, Path(args.tokenizer), args.seq_len)
        results = [run_mode(name, model_dir, data, root, steps, args.seq_len) for name in args.modes]
    print(table(results))
    Path(args.out).write_text(
        json.dumps({"steps": steps, "results": results}, indent=1) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main()
