"""End to end against fms-hf-tuning: the seed's formatter job, whole processes, runs alternating.

    python benchmarks/e2e_fms.py --setup                 # once: a venv per tool, the model, the data
    python benchmarks/e2e_fms.py --pairs 2               # the measurement (quiet machine)

The job (the README's formatter example at benchmark size): 2,000 input/output rows (the reference
tool's own ``twitter_complaints_input_output.jsonl``, 50 rows, repeated 40 times in file order),
``--data_formatter_template "### Input: {{input}} \\n\\n## Label: {{output}}" --response_template
"\\n## Label:"``, a random 4-layer Llama on the 32k LLaMA tokenizer (hidden 256, intermediate 688, 4
heads, untied embedding and head: 19.6M parameters, 16.4M of them embedding and head), 1 epoch, batch 8,
``--max_seq_length 256``, float32, lr 1e-4, logging every 10 steps, no checkpoints,
``--use_flash_attn false``, ``OMP_NUM_THREADS=2``.

Each run is one whole process, timed from its start to its exit (imports, data, model, training): what
a user waits for. fms-hf-tuning runs with its venv's python from a neutral folder (both tools install a
package named ``tuning``); ours runs with this interpreter and ``PYTHONPATH`` at this checkout. Each run
gets an empty datasets cache, so neither reuses the other's (or its own earlier) tokenization.

Two references put the numbers in context:
- **bare loop**: the same model and rows in a plain torch loop (padding-free, the head only at
  trained positions, the same AdamW), timed from its first step: no framework at all;
- **FLOP floor**: the job's floating-point work (decoder 6·N·tokens, causal attention, the head at
  trained positions) divided by the rate this machine reaches on one large float32 matmul (measured
  here, same threads), so "within 3× of the floor" is computed, not asserted.

Writes ``benchmarks/e2e_fms_results.json`` (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER = Path(os.environ.get("E2E_PEER_DATA", REPO.parent / "shared" / "peer-data" / "fms-hf-tuning"))
TOKENIZER = PEER / "tinyllama-tokenizer"
ROWS_FILE = PEER / "testdata" / "jsonl" / "twitter_complaints_input_output.jsonl"
DEFAULT_VENV = Path(os.environ.get("E2E_FMS_VENV", "/work/venvs/fms"))
DEFAULT_OURS_VENV = Path(os.environ.get("E2E_OURS_VENV", "/work/venvs/tuning"))
DEFAULT_WORKDIR = Path(os.environ.get("E2E_WORKDIR", Path(tempfile.gettempdir()) / "e2e_fms"))

ROWS = 2000
THREADS = int(os.environ.get("E2E_THREADS", "2"))  # the job says 2; --threads 1 for a shared machine
MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4}
TEMPLATE = "### Input: {{input}} \n\n## Label: {{output}}"
RESPONSE = "\n## Label:"
BATCH, MAX_LEN, LR, LOG_STEPS = 8, 256, 1e-4, 10
# What fms-hf-tuning 3.2.2 pins (its wheel's metadata), except torch: both tools run on this torch.
FMS_PINS = [
    "transformers==4.55.4",
    "trl==0.19.1",
    "peft==0.19.1",
    "accelerate>=1.9.0,<2.0.0",
    "datasets>=4.0.0,<5.0.0",
    "numpy>=1.26.4,<2.2.0",
    "sentencepiece>=0.1.99,<0.3",
    "tokenizers<=0.22",
    "simpleeval>=0.9.13,<2.0",
    "tqdm>=4.66.2,<5.0",
    "pillow>=12.3.0",
]


def job_flags(model: Path, data: Path, out: Path) -> list[str]:
    """The command line both tools get (their flag names are the same)."""
    return [
        "--model_name_or_path", str(model), "--training_data_path", str(data), "--output_dir", str(out),
        "--num_train_epochs", "1", "--per_device_train_batch_size", str(BATCH),
        "--max_seq_length", str(MAX_LEN), "--torch_dtype", "float32", "--learning_rate", str(LR),
        "--logging_strategy", "steps", "--logging_steps", str(LOG_STEPS), "--save_strategy", "no",
        "--use_flash_attn", "false", "--data_formatter_template", TEMPLATE,
        "--response_template", RESPONSE,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- setup


def setup_venvs(fms_venv: Path, ours_venv: Path) -> None:
    """Each tool in a venv of its own declared dependencies, on this machine's torch.

    fms-hf-tuning 3.2.2: its pins, then the tool without deps (its torch pin excludes 2.13). Ours: the
    dependencies in pyproject.toml only; the code itself comes from this checkout (``PYTHONPATH``). So
    neither run imports packages the other tool's environment or this development machine happen to have
    (bitsandbytes, scipy, boto3 are imported by peft, transformers and accelerate when installed).
    """
    import tomllib
    import torch

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for venv, pins in ((fms_venv, FMS_PINS), (ours_venv, deps)):
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"torch=={torch.__version__}"], check=True)
        subprocess.run([*pip, *pins], check=True)
    subprocess.run(
        [str(fms_venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "fms-hf-tuning==3.2.2"],
        check=True,
    )
    probe = "import tuning.sft_trainer as s, transformers; print(s.__file__, transformers.__version__)"
    for name, venv, extra in (
        ("fms-hf-tuning", fms_venv, {}),
        ("tuning", ours_venv, {"PYTHONPATH": str(REPO)}),
    ):
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-c", probe], cwd=tempfile.gettempdir(), env=clean_env(**extra),
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        print(f"{name} ready:", done.stdout.strip().splitlines()[-1])


def prepare_job(workdir: Path) -> tuple[Path, Path]:
    """The model folder and the data file, written once (deterministic: seeded weights, fixed rows)."""
    model_dir, data = workdir / "model", workdir / "data.jsonl"
    if (model_dir / "model.safetensors").exists() and data.exists():
        return model_dir, data
    workdir.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in ROWS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [{"input": r["input"], "output": r["output"]} for r in rows]
    data.write_text("".join(json.dumps(rows[i % len(rows)]) + "\n" for i in range(ROWS)), encoding="utf-8")

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((TOKENIZER / "config.json").read_text())
    config.update(MODEL, num_key_value_heads=MODEL["num_attention_heads"], tie_word_embeddings=False)
    config.update(torch_dtype="float32", use_cache=False, rope_theta=10000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).float()
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, model_dir / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    # the config written by hand, in the keys both transformers 4.55 and 5.x read the same way
    (model_dir / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    for f in TOKENIZER.iterdir():
        if f.name != "config.json":
            shutil.copyfile(f, model_dir / f.name)
    return model_dir, data


# ------------------------------------------------------------------------------------------- the runs


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(THREADS), **extra)
    return env


def run_tool(
    tool: str, python: str, model: Path, data: Path, workdir: Path, repo: Path | None = None
) -> dict:
    """One whole process of the job: ``python -m tuning.sft_trainer`` (fms-hf-tuning's when ``repo`` is
    None, else the checkout at ``repo``); wall and CPU seconds, final logged loss."""
    out = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=workdir))
    env = clean_env(HF_DATASETS_CACHE=str(out / "datasets-cache"))
    if repo is not None:
        env["PYTHONPATH"] = str(repo)
    cmd = [python, "-m", "tuning.sft_trainer", *job_flags(model, data, out / "out")]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    log = proc.stdout
    (out / "log.txt").write_text(log, encoding="utf-8")
    if proc.returncode:
        raise SystemExit(f"{tool} failed (exit {proc.returncode}); log: {out / 'log.txt'}\n{log[-3000:]}")
    losses = read_losses(out / "out" / "training_logs.jsonl")
    result = {"tool": tool, "seconds": seconds, "final_loss": losses[-1][1], "logged_steps": len(losses)}
    result["last_step"] = losses[-1][0]
    result["log"] = str(out / "log.txt")
    result["python"] = python
    # CPU time of the process: the work done, less disturbed than wall time by other load on the machine
    result["cpu_seconds"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    shutil.rmtree(out / "datasets-cache", ignore_errors=True)
    return result


def read_losses(path: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["data"]["step"], r["data"]["value"]) for r in records if r["name"] == "training_loss"]


# ---------------------------------------------------------------------------------- the bare torch loop


def tokenized_rows(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Each row → (ids, labels): BOS + the rendered template + EOS; loss on the tokens that cover a
    character after the response marker, and on EOS.

    Independent of our data stage on purpose (a plain string search and the tokenizer's offsets).
    """
    out = []
    for r in rows:
        text = f"### Input: {r['input']} \n\n## Label: {r['output']}"
        start = text.index(RESPONSE) + len(RESPONSE)
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids = enc["input_ids"] + [tokenizer.eos_token_id]
        labels = [
            t if b > max(a, start) else -100 for t, (a, b) in zip(ids, enc["offset_mapping"], strict=False)
        ]
        out.append((ids[:MAX_LEN], (labels + [tokenizer.eos_token_id])[:MAX_LEN]))
    return out


def bare_loop(model_dir: Path, data: Path) -> dict:
    """The job as a plain torch loop: one padded-free row per batch, head at trained positions only."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    samples = tokenized_rows(tokenizer, rows)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(42)).tolist()
    batches = [[samples[i] for i in order[s : s + BATCH]] for s in range(0, len(order), BATCH)]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / len(batches))
    losses, window = [], []
    start = time.perf_counter()
    for batch in batches:
        ids = torch.tensor([t for s, _ in batch for t in s]).unsqueeze(0)
        labels = torch.tensor([t for _, lab in batch for t in ([-100] + lab[1:])])
        positions = torch.cat([torch.arange(len(s)) for s, _ in batch]).unsqueeze(0)
        hidden = decoder(input_ids=ids, position_ids=positions).last_hidden_state[0]
        keep = labels[1:] != -100
        loss = F.cross_entropy(head(hidden[:-1][keep]), labels[1:][keep], reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        if len(window) == LOG_STEPS:
            losses.append(sum(window) / len(window))
            window = []
    seconds = time.perf_counter() - start
    return {"tool": "bare", "seconds": seconds, "final_loss": losses[-1], "steps": len(batches)}


# ------------------------------------------------------------------------------------------ FLOP floor


def job_flops(model_dir: Path, data: Path) -> dict:
    """Floating-point operations the job needs at the least (forward + backward = 3× forward)."""
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    h, inter, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "vocab_size"))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    samples = tokenized_rows(tokenizer, rows)
    tokens = sum(len(ids) for ids, _ in samples)
    trained = sum(sum(1 for t in lab[1:] if t != -100) for _, lab in samples)
    decoder_params = layers * (4 * h * h + 3 * h * inter)  # q, k, v, o and gate, up, down (norms: ~0)
    decoder = 6 * decoder_params * tokens
    # causal attention: QK^T and AV over the lower triangle, 2·L²·h per layer forward, ×3 with backward
    attention = 3 * layers * sum(2 * len(ids) ** 2 * h for ids, _ in samples)
    head = 6 * h * vocab * trained
    return {
        "tokens": tokens,
        "trained_tokens": trained,
        "decoder_params": decoder_params,
        "flops_decoder": decoder,
        "flops_attention": attention,
        "flops_head": head,
        "flops": decoder + attention + head,
    }


def matmul_rate(threads: int = THREADS, n: int = 2048, reps: int = 10) -> float:
    """Best float32 FLOP/s of an n×n×n matmul on ``threads`` threads (what the BLAS reaches here)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------------------------- main


def child(kind: str, model: Path, data: Path) -> None:
    if kind == "bare":
        print(json.dumps(bare_loop(model, data)))
    else:
        flops = job_flops(model, data)
        rate = matmul_rate()
        print(json.dumps({**flops, "matmul_flops_per_s": rate, "floor_seconds": flops["flops"] / rate}))


def run_child(kind: str, python: str, model: Path, data: Path) -> dict:
    cmd = [python, __file__, "--child", kind, "--model", str(model), "--data", str(data)]
    env = clean_env(PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(pairs: list[dict], bare: list[dict], floor: dict) -> str:
    baseline = "baseline" in pairs[0]
    head = "| run | fms-hf-tuning 3.2.2 | tuning | ratio |" + (" tuning (baseline) |" if baseline else "")
    lines = [
        head + " final loss fms | final loss tuning |",
        "|---|---:|---:|---:|" + ("---:|" if baseline else "") + "---:|---:|",
    ]
    for i, p in enumerate(pairs, 1):
        fms, ours = p["fms"], p["ours"]
        extra = f" {p['baseline']['seconds']:.1f} s |" if baseline else ""
        lines.append(
            f"| pair {i} | {fms['seconds']:.1f} s | {ours['seconds']:.1f} s | "
            f"{fms['seconds'] / ours['seconds']:.2f}× |{extra} {fms['final_loss']:.4f} | {ours['final_loss']:.4f} |"
        )
    best = min(p["ours"]["seconds"] for p in pairs)
    lines += [
        "",
        f"FLOP floor: {floor['flops'] / 1e12:.2f} TFLOP ({floor['tokens']} tokens, {floor['trained_tokens']} "
        f"trained) at {floor['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s (2048³ matmul, {THREADS} threads) = "
        f"{floor['floor_seconds']:.1f} s; our fastest run took {best / floor['floor_seconds']:.2f}× the floor.",
    ]
    for b in bare:
        lines.append(
            f"Bare torch loop (start-up excluded): {b['seconds']:.1f} s, final loss {b['final_loss']:.4f}."
        )
    return "\n".join(lines)


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create both venvs and the job, then exit")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="fms-hf-tuning venv (E2E_FMS_VENV)")
    parser.add_argument(
        "--ours-venv", type=Path, default=DEFAULT_OURS_VENV, help="venv with our dependencies (E2E_OURS_VENV)"
    )
    parser.add_argument("--ours-python", help="run ours with this interpreter instead of --ours-venv's")
    parser.add_argument(
        "--baseline", type=Path, help="another checkout of ours (e.g. main) run in every pair: before/after"
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="model, data, run folders")
    parser.add_argument("--pairs", type=int, default=2, help="alternating fms/ours pairs")
    parser.add_argument("--only", choices=["fms", "ours"], help="run one tool once (checks)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare torch loop")
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="OMP_NUM_THREADS of every run (the job: 2; 1 on a busy machine)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "e2e_fms_results.json")
    parser.add_argument("--child", choices=["bare", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model, args.data)
    THREADS = args.threads
    os.environ["E2E_THREADS"] = str(args.threads)  # for the bare-loop and floor children
    if args.setup:
        setup_venvs(args.venv, args.ours_venv)
        prepare_job(args.workdir)
        return None
    fms_python = str(args.venv / "bin" / "python")
    ours_python = args.ours_python or str(args.ours_venv / "bin" / "python")
    for python in (fms_python, ours_python):
        if not Path(python).exists():
            raise SystemExit(f"{python} does not exist: run `python {__file__} --setup` first")
    model, data = prepare_job(args.workdir)
    tools = {"fms": (fms_python, None), "ours": (ours_python, REPO)}
    if args.baseline:
        tools["baseline"] = (ours_python, args.baseline.resolve())
    if args.only:
        python, repo = tools[args.only]
        print(json.dumps(run_tool(args.only, python, model, data, args.workdir, repo)))
        return None
    floor = run_child("floor", ours_python, model, data)
    print(
        f"floor: {floor['floor_seconds']:.1f} s ({floor['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)", flush=True
    )
    bare = [] if args.no_bare else [run_child("bare", ours_python, model, data)]
    for b in bare:
        print(f"bare loop: {b['seconds']:.1f} s, final loss {b['final_loss']:.4f}", flush=True)
    pairs = []
    for i in range(args.pairs):
        order = list(tools) if i % 2 == 0 else list(reversed(tools))
        pair = {}
        for tool in order:
            python, repo = tools[tool]
            pair[tool] = run_tool(tool, python, model, data, args.workdir, repo)
            r = pair[tool]
            print(f"pair {i + 1} {tool:8s} {r['seconds']:6.1f} s (CPU {r['cpu_seconds']:6.1f} s) "
                  f"loss {r['final_loss']:.4f}", flush=True)  # fmt: skip
        pair["ratio"] = pair["fms"]["seconds"] / pair["ours"]["seconds"]
        pairs.append(pair)
    report = {
        "job": {
            "rows": ROWS,
            "model": MODEL,
            "threads": THREADS,
            "flags": job_flags(model, data, Path("OUT")),
        },
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "floor": floor,
        "bare": bare,
        "pairs": pairs,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(table(pairs, bare, floor))
    return None


if __name__ == "__main__":
    main()
