"""Where one run of our end-to-end job (``benchmarks/e2e_fms.py``) spends its time, stage by stage.

    python benchmarks/profile_e2e.py [--threads 1] [--cprofile FILE] [--out benchmarks/e2e_profile.txt]

Runs the real entry point (``tuning.sft_trainer.main``) in this process on the benchmark's job, with
timers around each stage of ``run()`` and each part of a training step (data, forward + loss,
backward, gradient clipping, optimizer, scheduler, callbacks, logging). Every phase is reported in
process CPU seconds as well as wall seconds: on a machine shared with other work, CPU time of a
one-thread run measures the work done and barely moves with the load, while wall time does.
``--cprofile FILE`` also writes a cProfile of the whole run (CPU-time clock) and its top functions.
"""

from __future__ import annotations

import time

T0_CPU, T0_WALL = time.process_time(), time.perf_counter()  # before any import of ours or torch's

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
# --repo DIR profiles another checkout (e.g. main, for a before/after pair); read before argparse runs
REPO = Path(sys.argv[sys.argv.index("--repo") + 1]) if "--repo" in sys.argv else HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

TOTALS: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # phase → [cpu, wall, calls]
ACTIVE: list[str] = []  # phases are exclusive: an inner phase's time is not also its outer phase's


@contextlib.contextmanager
def phase(name: str):
    cpu, wall = time.process_time(), time.perf_counter()
    ACTIVE.append(name)
    try:
        yield
    finally:
        ACTIVE.pop()
        d_cpu, d_wall = time.process_time() - cpu, time.perf_counter() - wall
        entry = TOTALS[name]
        entry[0] += d_cpu
        entry[1] += d_wall
        entry[2] += 1
        if ACTIVE:  # take the inner time out of the enclosing phase
            outer = TOTALS[ACTIVE[-1]]
            outer[0] -= d_cpu
            outer[1] -= d_wall


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with phase(name):
            return fn(*args, **kwargs)

    return wrapper


def instrument() -> None:
    """Wrap the entry point's stages and the Trainer's per-step parts in timers."""
    with phase("import tuning.sft_trainer"):
        import tuning.sft_trainer as entry
        from tuning.train import trainer as train_module
    stages = {
        "setup_logging": "start: logging, argv",
        "select_cpu_backend": "start: logging, argv",
        "parse_config": "config: parse + validate",
        "check_data_config": "config: parse + validate",
        "save_resolved_config": "config: write resolved_config.yaml",
        "build_trackers": "trackers",
        "load_tokenizer": "tokenizer",
        "load_model_config": "model: config",
        "quantization_config": "model: config",
        "build_datasets": "data: load + format + tokenize",
        "precision_plan": "model: config",
        "load_model": "model: load weights",
        "apply_peft": "model: peft (none)",
        "build_trainer": "trainer: build",
        "log_run_start": "trainer: start lines",
        "resume_checkpoint": "trainer: resume check",
        "write_loss_plot": "outputs: loss.png",
        "build_summary": "outputs: summary",
        "write_summary": "outputs: summary",
        "leave_process_group": "outputs: summary",
    }
    for name, label in stages.items():
        setattr(entry, name, timed(label, getattr(entry, name)))

    cls = train_module.SFTTrainer
    cls.train = timed("train: loop (Trainer's own code)", cls.train)
    cls.get_batch_samples = timed("train: data (sampler + collator)", cls.get_batch_samples)
    cls.compute_loss = timed("train: forward + loss", cls.compute_loss)
    cls._clip_grad_norm = timed("train: clip grad norm", cls._clip_grad_norm)
    cls._maybe_log_save_evaluate = timed("train: logging", cls._maybe_log_save_evaluate)
    cls.create_optimizer_and_scheduler = timed("train: optimizer setup", cls.create_optimizer_and_scheduler)
    create_optimizer = cls.create_optimizer

    def create_and_time(self, *args, **kwargs):
        optimizer = create_optimizer(self, *args, **kwargs)
        optimizer.step = timed("train: optimizer step", optimizer.step)
        return optimizer

    cls.create_optimizer = create_and_time
    from accelerate import Accelerator
    from transformers.trainer_callback import CallbackHandler

    Accelerator.backward = timed("train: backward", Accelerator.backward)
    CallbackHandler.call_event = timed("train: callbacks", CallbackHandler.call_event)
    from torch.optim.lr_scheduler import LRScheduler

    LRScheduler.step = timed("train: lr scheduler", LRScheduler.step)
    import torch

    torch.nn.Module.zero_grad = timed("train: zero_grad", torch.nn.Module.zero_grad)
    return entry


def profile_ops(steps: int, first: int = 20) -> None:
    """torch.profiler over ``steps`` training steps from step ``first``: which ops take the time."""
    import torch
    from transformers import TrainerCallback

    from tuning.train import trainer as train_module

    class OpProfile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == first + steps:
                self.prof.__exit__(None, None, None)
                print(self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
                self.prof = None

    build = train_module.build_trainer

    def build_with_profile(*a, **k):
        trainer = build(*a, **k)
        trainer.add_callback(OpProfile())
        return trainer

    import tuning.sft_trainer as entry

    entry.build_trainer = build_with_profile


def process_age() -> float:
    """Wall seconds since this process started (Linux: /proc), so start-up before our first line counts."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - T0_WALL


def report(total_cpu: float, total_wall: float) -> str:
    lines = [
        "| phase | CPU s | wall s | calls | share of CPU |",
        "|---|---:|---:|---:|---:|",
        f"| interpreter start | {T0_CPU:.2f} | | 1 | {T0_CPU / total_cpu:.1%} |",
    ]
    accounted = T0_CPU
    for name, (cpu, wall, calls) in sorted(TOTALS.items(), key=lambda kv: -kv[1][0]):
        accounted += cpu
        lines.append(f"| {name} | {cpu:.2f} | {wall:.2f} | {calls} | {cpu / total_cpu:.1%} |")
    rest = total_cpu - accounted
    lines.append(f"| rest (unwrapped) | {rest:.2f} | | | {rest / total_cpu:.1%} |")
    lines.append(f"| **total (process)** | **{total_cpu:.2f}** | **{total_wall:.2f}** | | 100% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = work)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to profile (default: this one)")
    parser.add_argument("--cprofile", type=Path, help="also write a cProfile of the run here")
    parser.add_argument(
        "--ops", type=int, default=0, metavar="N", help="also print torch.profiler's op table over N steps"
    )
    parser.add_argument(
        "--dense-embedding", action="store_true", help="A/B: torch's AdamW on every row (no SparseRowsAdamW)"
    )
    parser.add_argument("--out", type=Path, help="append the table to this file")
    parser.add_argument("--label", default="", help="a heading for the table in --out")
    args, extra = parser.parse_known_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import e2e_fms

    work = args.workdir or e2e_fms.DEFAULT_WORKDIR
    model, data = e2e_fms.prepare_job(work)
    out = Path(tempfile.mkdtemp(prefix="profile-", dir=work))
    os.environ["HF_DATASETS_CACHE"] = str(out / "datasets-cache")  # cold, as in the benchmark
    argv = [*e2e_fms.job_flags(model, data, out / "out"), *extra]
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
    entry = instrument()
    if args.dense_embedding:
        from tuning.train import trainer as train_module

        train_module.with_sparse_rows = lambda cls, kwargs, model: (cls, kwargs)
    if args.ops:
        profile_ops(args.ops)
    code = entry.main(argv)
    total_cpu, total_wall = time.process_time(), process_age()
    if profiler:
        import pstats

        profiler.disable()
        profiler.dump_stats(str(args.cprofile))
        with open(args.cprofile.with_suffix(".txt"), "w") as f:
            stats = pstats.Stats(str(args.cprofile), stream=f)
            stats.sort_stats("cumulative").print_stats(60)
            stats.sort_stats("tottime").print_stats(40)
    if code:
        raise SystemExit(f"training failed with exit code {code}")
    losses = e2e_fms.read_losses(out / "out" / "training_logs.jsonl")
    table = report(total_cpu, total_wall)
    head = f"{args.label or 'profile'}: {args.threads} thread(s), final loss {losses[-1][1]!r}"
    print(head)
    print(table)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(f"\n### {head}\n\n{table}\n")


if __name__ == "__main__":
    main()
