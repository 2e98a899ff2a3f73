"""Cluster and container launcher: one job file in, one ``accelerate launch`` of ``tuning.sft_trainer`` out.

``tuning launch JOB.yaml`` (or ``python -m tuning.launch JOB.json``; with no argument the job comes from the
environment as in fms-hf-tuning: ``$SFT_TRAINER_CONFIG_JSON_ENV_VAR`` (base64-encoded JSON) or
``$SFT_TRAINER_CONFIG_JSON_PATH``). The job file is a YAML or JSON mapping of training flags plus
an optional ``accelerate_launch_args`` mapping of ``accelerate launch`` flags; ``accelerate launch``
flags after the job file (or alone, with the job from the environment) override those
(``tuning launch job.yaml --machine_rank $NODE_RANK``: one job file for every machine). Read with
``yaml.safe_load``/``json.loads`` only: no pickle, no code.

Why this exists next to plain ``accelerate launch``: accelerate reports every failure as exit code 1, so
a scheduler could not tell a user error (1: fix the job) from an internal failure (203: retry or report).
Each rank writes its one-line reason to the termination log; the launcher points that log at a file of
its own, maps the reason back to the exit code, and copies the lines where the user expects them
(``$TERMINATION_LOG_FILE`` or ``output_dir/error.log``). Guide: docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from tuning.compat import argparse as argparse_private
from tuning.errors import (
    INTERNAL_ERROR_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    UserError,
    did_you_mean,
    run_command,
    write_termination_log,
)
from tuning.files import (
    JOB_ENVS,
    JOB_PATH_ENV,
    JOB_TEXT_ENV,
    LAUNCH_ARGS_KEY,
    job_from_environment,
    read_mapping_file,
)

ACCELERATE_KEY = LAUNCH_ARGS_KEY
COMPLETE_MARKER = ".complete"
# shipped inside the package (package data), so a wheel install has it; fixtures/ at the repo root links to it
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FSDP_DEFAULTS = FIXTURES / "accelerate_fsdp_defaults.yaml"
# accelerate flags that choose the distributed mode themselves: then our FSDP defaults stay out of the way
_MODE_FLAGS = ("config_file", "use_fsdp", "multi_gpu", "use_deepspeed", "use_megatron_lm", "cpu", "tpu")
# the trainer's termination line after a signal: "interrupted: stopped by SIGTERM at step 3 ..."
_STOPPED_BY = re.compile(r"stopped by (SIG[A-Z]+)\b")


def read_job(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training flags, accelerate launch flags) from a YAML/JSON job file."""
    return split_job(read_mapping_file(path, "job file"), path)


def split_job(job: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training flags, accelerate launch flags) of a job mapping."""
    job = dict(job)
    launch = job.pop(ACCELERATE_KEY, None) or {}
    if not isinstance(launch, dict):
        raise UserError(f"{ACCELERATE_KEY} in {where} must be a mapping of accelerate launch flags")
    return job, {k.replace("-", "_"): v for k, v in launch.items()}


def visible_gpus() -> int:
    import torch  # deferred: reading the job must not pay for importing torch

    return torch.cuda.device_count()


def resolve_launch_args(launch: dict[str, Any], gpus: int) -> dict[str, Any]:
    """Fill in ``num_processes`` (visible GPUs on each machine) and, for several processes without a mode
    of the user's own, the FSDP defaults."""
    resolved = dict(launch)
    if resolved.get("num_processes") is None:
        resolved["num_processes"] = max(gpus, 1) * int(resolved.get("num_machines") or 1)
    if int(resolved["num_processes"]) > 1 and not any(resolved.get(k) for k in _MODE_FLAGS):
        resolved["config_file"] = str(FSDP_DEFAULTS)
    return resolved


def accelerate_flags(launch: dict[str, Any]) -> list[str]:
    """``--key=value`` per flag (true booleans as bare ``--key``); unknown flags are a user error."""
    from accelerate.commands.launch import launch_command_parser

    known = {a.dest for a in argparse_private.actions(launch_command_parser())}
    flags = []
    for key, value in launch.items():
        if key not in known:
            raise UserError(
                f"unknown key '{key}' in {ACCELERATE_KEY}{did_you_mean(key, sorted(known), flag=True)}"
            )
        if value is True:
            flags.append(f"--{key}")
        elif value not in (None, False):
            flags.append(f"--{key}={','.join(map(str, value)) if isinstance(value, list) else value}")
    return flags


def build_command(launch: dict[str, Any], config_path: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *accelerate_flags(launch),
        "--module",
        "tuning.sft_trainer",
        "--config",
        str(config_path),
    ]


def exit_code_for(returncode: int, reasons: list[str], signum: int | None) -> int:
    """The job's exit code from accelerate's (always 1 on failure) and the ranks' termination lines."""
    if returncode == 0:
        return 0
    if signum is not None:
        return 128 + signum  # the shell convention, as the trainer itself uses when it is signalled
    stopped = [_STOPPED_BY.search(r) for r in reasons]
    if reasons and all(r.startswith("interrupted:") for r in reasons) and all(stopped):
        # another machine's launcher was signalled: every rank here saved and stopped with it
        return 128 + int(signal.Signals[stopped[0].group(1)])  # type: ignore[union-attr]
    if reasons and all(r.startswith("error:") for r in reasons):
        return USER_ERROR_EXIT_CODE
    return INTERNAL_ERROR_EXIT_CODE  # an internal error, or a crash that left no reason at all


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``accelerate launch`` flags given after the job file (``--machine_rank 1``, ``--num_machines=2``,
    a bare ``--flag`` is true): what differs between the machines of one job, e.g. from the scheduler's
    environment, while the job file stays the same everywhere."""
    flags: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise UserError(f"tuning launch: expected an --accelerate_flag after the job file, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value, i = tokens[i + 1], i + 1
        flags[key.replace("-", "_")] = value if (eq or value) else True
        i += 1
    return flags


def shipped_config(path: str) -> str:
    """A config file path as given, or the shipped file of that name (package data) when no such file
    exists here: ``config_file: accelerate_deepspeed_zero3.yaml`` works from a wheel install too."""
    shipped = FIXTURES / Path(path).name
    return str(shipped) if not Path(path).exists() and shipped.is_file() else path


def check_engine(launch: dict[str, Any], training: dict[str, Any]) -> None:
    """A DeepSpeed job without the package stops here with one line (accelerate would print a traceback
    and exit 1, a rank with ``--deepspeed`` would fail inside TrainingArguments)."""
    config = launch.get("config_file")
    distributed_type = ""
    if config and Path(config).is_file():
        distributed_type = str((read_mapping_file(config, "accelerate config") or {}).get("distributed_type"))
    if launch.get("use_deepspeed") or training.get("deepspeed") or distributed_type.upper() == "DEEPSPEED":
        from tuning.train import DEEPSPEED_MISSING, deepspeed_installed

        if not deepspeed_installed():
            raise UserError(DEEPSPEED_MISSING)


def run_job(job: dict[str, Any], where: str, overrides: dict[str, Any] | None = None) -> int:
    """Launch one job mapping (``where``: the file or variable it came from, for messages); ``overrides``:
    accelerate flags from the command line, over the job's own."""
    training, launch = split_job(job, where)
    launch = resolve_launch_args({**launch, **(overrides or {})}, visible_gpus())
    if launch.get("config_file"):
        launch["config_file"] = shipped_config(str(launch["config_file"]))
    check_engine(launch, training)
    output_dir = training.get("output_dir")
    with tempfile.TemporaryDirectory(prefix="tuning-launch-") as tmp:
        config_path = Path(tmp) / "training_args.json"
        config_path.write_text(json.dumps(training), encoding="utf-8")
        reasons_path = Path(tmp) / "termination.log"
        # the ranks get the job as --config; a job variable left in their environment would be a second source
        env = {k: v for k, v in os.environ.items() if k not in JOB_ENVS}
        env["TERMINATION_LOG_FILE"] = str(reasons_path)
        returncode, signum = _run_forwarding_signals(build_command(launch, config_path), env)
        reasons = _read_lines(reasons_path)
    for line in reasons:  # where the user (or Kubernetes) looks for them
        write_termination_log(line, output_dir)
    code = exit_code_for(returncode, reasons, signum)
    if code == 0 and output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / COMPLETE_MARKER).touch()
    return code


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> tuple[int, int | None]:
    """Run ``cmd``; a SIGTERM/SIGINT sent to us goes on to the ranks (they checkpoint and stop).

    Straight to the ranks, not to ``accelerate launch``: torch's elastic agent inside it answers a signal
    by signalling its ranks and SIGKILLing them 30 s later (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``), which
    would cut a longer checkpoint write short, and then exits 1. The ranks themselves take as long as a
    step and a checkpoint need; the scheduler's grace period is the only limit. Before the ranks exist
    the signal goes to the launcher itself.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # signals reach it once: from us
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for target in _ranks(proc.pid) or [proc]:
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                target.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return returncode, (received[0] if received else None)


def _ranks(launcher_pid: int) -> list[Any]:
    """The processes ``accelerate launch`` started (its elastic agent's workers): its direct children,
    not their own (dataloader workers must not be signalled)."""
    try:
        return psutil.Process(launcher_pid).children(recursive=False)
    except psutil.NoSuchProcess:
        return []


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0

    def body() -> int:
        usage = (
            f"usage: tuning launch JOB.yaml [--accelerate_flag VALUE ...] (or set ${JOB_PATH_ENV} or "
            f"${JOB_TEXT_ENV}); got {argv}"
        )
        from_env = not argv or argv[0].startswith("--")  # no job file: the job comes from the environment
        job = job_from_environment() if from_env else (argv[0], read_mapping_file(argv[0], "job file"))
        if job is None:
            raise UserError(usage)
        where, values = job
        return run_job(values, where, parse_overrides(argv if from_env else argv[1:]))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
