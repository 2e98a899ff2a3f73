"""Two machines on localhost: two launchers (``--num_machines 2 --machine_rank R --main_process_ip
127.0.0.1 --rdzv_backend static``), one process each, over gloo, through the shipped FSDP fixture.

What a cluster needs from a multi-node job, each checked against a 1-process reference run with the
same global batch (8 rows per optimizer step) and one loss line per step:

- the two machines train to the reference's losses (1e-4, the tolerance of tests/test_distributed.py),
  global rank 0 alone writes the logs, summary and final model, and with ``--process_data_once_per job``
  on a shared datasets cache one process in the whole job tokenizes (the other reads the cache);
- ``tuning launch`` on each machine (one job file, ``--machine_rank R`` after it): a SIGTERM to ONE
  machine's launcher stops every rank after one checkpoint at the same step, and both launchers exit
  143; kill -9 of both machines after a later checkpoint, then the same two commands again, and the
  run ends with the uninterrupted reference's loss at every step. Each machine has its own datasets
  cache there (node-local disks), so each tokenizes for itself (``node``, the default).

Five 2-machine launches in all (~15 s each here, mostly interpreter start-up).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, text_rows, write_json
from tests.test_distributed import TOLERANCE, free_port
from tuning import sft_trainer
from tuning.train import read_training_logs
from tuning.train.checkpoint_format import is_complete

pytestmark = pytest.mark.slow

FIXTURE = REPO / "fixtures" / "accelerate_fsdp_defaults.yaml"
FAULT_SCRIPT = REPO / "tests" / "train_with_fault.py"
MAX_STEPS = 32
SAVE_STEPS = 8


def flags(model_dir: Path, data: Path, out: Path, per_device: int, *extra: str) -> list[str]:
    return [
        *("--model_name_or_path", str(model_dir), "--training_data_path", str(data)),
        *("--output_dir", str(out), "--dataset_text_field", "output", "--response_template", "\n### Label:"),
        *("--torch_dtype", "float32", "--max_steps", str(MAX_STEPS), "--learning_rate", "1e-3"),
        *("--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", "2"),
        *("--logging_steps", "1", "--save_steps", str(SAVE_STEPS), "--save_model_dir", str(out / "final")),
        *extra,
    ]


def losses(out: Path) -> dict[int, float]:
    records = read_training_logs(out)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice (two writers?): {steps}"
    return {r["step"]: r["value"] for r in records}


def complete_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if is_complete(p))


def assert_losses_match(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    for step, value in want.items():
        assert got[step] == pytest.approx(value, abs=TOLERANCE), step


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """(root, data file, the 1-process reference output, its loss per step)."""
    root = tmp_path_factory.mktemp("multinode")
    data = write_json(root / "data.json", text_rows())  # 32 rows: 4 optimizer steps per epoch
    reference = root / "reference"
    assert sft_trainer.main(flags(tiny_model_dir, data, reference, 4)) == 0
    want = losses(reference)
    assert sorted(want) == list(range(1, MAX_STEPS + 1))
    return root, data, reference, want


def machine_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TERMINATION_LOG_FILE", "RANK", "WORLD_SIZE")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_two_machines_train_like_one_process_with_one_writer(setup, tiny_model_dir):
    root, data, reference, want = setup
    out, cache = root / "plain", root / "shared-datasets-cache"
    record = root / "processed-by.txt"
    env = machine_env(HF_DATASETS_CACHE=str(cache), RECORD_DATA_PROCESSING=str(record))
    port = free_port()
    machines = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FIXTURE)]
        cmd += ["--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank)]
        cmd += [
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--rdzv_backend",
            "static",
        ]
        cmd += [str(FAULT_SCRIPT), "none", "0", *flags(tiny_model_dir, data, out, 2)]
        cmd += ["--process_data_once_per", "job", "--save_strategy", "no"]
        # the serve check tokenizes a few rows again after the save: only the data stage's pass counts here
        cmd += ["--serve_check", "off"]
        log = open(root / f"plain-{rank}.log", "w")  # noqa: SIM115 (closed below)
        machines.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = [proc.wait(timeout=300) for proc, _ in machines]
    for _, log in machines:
        log.close()
    logs = [(root / f"plain-{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "parameters held per rank 20880, 20880" in logs[0]  # sharded across the two machines

    assert_losses_match(losses(out), want)  # every step once: one writer, the reference's values
    assert record.read_text().split() == ["0"]  # tokenized once in the job, by global rank 0
    assert "run_summary.json" in os.listdir(out) and not list(out.glob("checkpoint-*"))
    saved, expected = (
        load_file(out / "final" / "model.safetensors"),
        load_file(reference / "final" / "model.safetensors"),
    )
    assert saved.keys() == expected.keys()
    assert max((saved[k] - expected[k]).abs().max().item() for k in expected) < 1e-4


def _start(job: Path, root: Path, name: str) -> list[subprocess.Popen]:
    """``tuning launch JOB --machine_rank R`` for both machines, each with its own datasets cache."""
    machines = []
    for rank in (0, 1):
        env = machine_env(HF_DATASETS_CACHE=str(root / f"node{rank}-datasets-cache"))
        cmd = [sys.executable, "-m", "tuning.launch", str(job), "--machine_rank", str(rank)]
        log = open(root / f"{name}-{rank}.log", "w")  # noqa: SIM115 (the child keeps it)
        machines.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return machines


def _wait_for(condition, machines: list[subprocess.Popen], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert all(m.poll() is None for m in machines), f"a machine ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in time"
        time.sleep(0.05)


def _kill_9(machines: list[subprocess.Popen]) -> None:
    """SIGKILL both machines whole: launcher, accelerate, ranks (collected first, then killed)."""
    procs = []
    for machine in machines:
        root = psutil.Process(machine.pid)
        procs += [root, *root.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    for machine in machines:
        machine.wait(timeout=60)


def _write_job(root: Path, tiny_model_dir: Path, data: Path, out: Path) -> Path:
    args = flags(tiny_model_dir, data, out, 2)
    job = {key.removeprefix("--"): value for key, value in zip(args[::2], args[1::2], strict=True)}
    job["accelerate_launch_args"] = {
        "num_processes": 2,
        "num_machines": 2,
        "main_process_ip": "127.0.0.1",
        "main_process_port": free_port(),
        "rdzv_backend": "static",
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_sigterm_to_one_machine_stops_both_with_143_and_kill_9_of_both_resumes_exactly(setup, tiny_model_dir):
    root, data, _, want = setup
    root = root / "faults"
    root.mkdir()
    out = root / "out"
    job = _write_job(root, tiny_model_dir, data, out)

    # 1. SIGTERM to machine 1's launcher once two steps are logged
    first = _start(job, root, "sigterm")
    logged = out / "training_logs.jsonl"
    _wait_for(
        lambda: logged.is_file() and len(logged.read_text().splitlines()) >= 2, first, "second logged step"
    )
    first[1].send_signal(signal.SIGTERM)
    codes = [m.wait(timeout=120) for m in first]
    logs = [(root / f"sigterm-{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [143, 143], logs[0][-3000:] + logs[1][-3000:]
    stopped = max(losses(out))  # the step every rank stopped after
    assert stopped < MAX_STEPS, "the signal arrived after training ended"
    # exactly one checkpoint for the signal (the scheduled ones before it are the only others)
    assert complete_steps(out) == sorted({s for s in range(SAVE_STEPS, stopped + 1, SAVE_STEPS)} | {stopped})
    for rank in (0, 1):  # each machine's rank says why it stopped, and both say the same step
        assert (
            f"interrupted: stopped by SIGTERM at step {stopped} after saving checkpoint-{stopped}"
            in logs[rank]
        )
    assert not (out / ".complete").exists() and not (out / "final").exists()
    assert all(list((root / f"node{rank}-datasets-cache").rglob("cache-*.arrow")) for rank in (0, 1))

    # 2. the same commands again, then kill -9 of both machines once a later checkpoint is committed
    job = _write_job(root, tiny_model_dir, data, out)  # a fresh port: the old one may linger in TIME_WAIT
    next_save = (stopped // SAVE_STEPS + 1) * SAVE_STEPS
    second = _start(job, root, "kill")
    _wait_for(lambda: is_complete(out / f"checkpoint-{next_save}"), second, f"checkpoint-{next_save}")
    _kill_9(second)
    assert f"resuming from {out / f'checkpoint-{stopped}'}" in (root / "kill-0.log").read_text()
    resume_at = complete_steps(out)[-1]
    assert resume_at >= next_save

    # 3. and again: it resumes from the newest complete checkpoint and ends where the reference ends
    job = _write_job(root, tiny_model_dir, data, out)
    third = _start(job, root, "resume")
    codes = [m.wait(timeout=300) for m in third]
    logs = [(root / f"resume-{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert f"resuming from {out / f'checkpoint-{resume_at}'}" in logs[0]
    assert_losses_match(losses(out), want)
    assert (out / ".complete").is_file() and (out / "final" / "model.safetensors").is_file()
