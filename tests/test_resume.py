"""Resume end to end: kill -9 mid-step and mid-save, SIGTERM, ``false`` and PATH, best model + limit.

One uninterrupted run is the reference: 16 rows, batch 2 x accumulation 2 (4 steps per epoch), 6 steps
(so resuming at step 2 crosses an epoch boundary), a checkpoint every 2 steps, a loss line every step.
Interrupted runs are separate processes (tests/train_with_fault.py puts the fault at an exact moment):
forked children running the CLI's ``main``, which skips the 15 s of imports a fresh interpreter costs
here; the runs that resume are in-process.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import io_rows, write_json
from tests.train_with_fault import inject
from tuning.config import parse_config
from tuning.sft_trainer import main, run
from tuning.testing.tiny_model import write_tiny_model
from tuning.train import read_training_logs
from tuning.train.checkpoint_format import COMPLETE_MARKER, is_complete, verify_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    train = write_json(root / "train.json", io_rows(2))

    def argv(out, *extra: str) -> list[str]:
        return [
            *("--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(train)),
            *("--output_dir", str(out), "--torch_dtype", "float32", "--use_flash_attn", "false"),
            *("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"),
            *("--max_steps", "6", "--learning_rate", "1e-3"),
            *("--save_strategy", "steps", "--save_steps", "2", "--logging_strategy", "steps"),
            *("--logging_steps", "1", *extra),
        ]

    reference = root / "reference"
    run(parse_config(argv(reference)))
    return root, argv, reference, losses(reference)


def losses(output_dir) -> dict[int, float]:
    records = read_training_logs(output_dir)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicated steps in the log: {steps}"
    return {r["step"]: r["value"] for r in records}


def start_with_fault(fault: str | None, step: int, argv: list[str], log, env: dict | None = None) -> int:
    """The CLI's ``main`` in a forked child: a real separate process that can be SIGKILLed, without the
    15 s of imports a fresh interpreter costs here. Returns its pid (see :func:`finish`)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 99
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # noqa: SIM115 (closed by _exit)
            os.environ.update(env or {})
            if fault:
                for one in fault.split("+"):  # several faults: "slow-save+sigterm-in-step"
                    inject(one, step)
            code = main(argv)
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def finish(pid: int, log) -> tuple[int, str]:
    """(exit code, -N if killed by N; its output) of a child from :func:`start_with_fault`."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), log.read_text()


def fork_with_fault(
    fault: str | None, step: int, argv: list[str], log, env: dict | None = None
) -> tuple[int, str]:
    return finish(start_with_fault(fault, step, argv, log, env), log)


def complete_steps(output_dir) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*") if is_complete(p))


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


def test_reference_run_commits_every_checkpoint(job):
    _, _, reference, want = job
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    assert complete_steps(reference) == [2, 4, 6]
    marker = json.loads((reference / "checkpoint-4" / COMPLETE_MARKER).read_text())
    assert (marker["step"], marker["epoch"]) == (4, 1.0)
    assert marker["logging_window"] == {"loss_sum": [0.0], "last_logged_step": 4}  # logged every step
    assert (
        marker["files"]["model.safetensors"]
        == (reference / "checkpoint-4" / "model.safetensors").stat().st_size
    )
    assert marker["fingerprint"]["settings"]["effective_batch"] == 4
    assert marker["fingerprint"]["batch_layout"] == [2, 2, 1]


def test_kill_9_in_a_step_and_in_a_save_then_rerun_matches_uninterrupted(job, caplog):
    root, argv, _, want = job
    out = root / "killed"

    code, stderr = fork_with_fault("kill-in-step", 3, argv(out), root / "killed-1.log")
    assert code == -signal.SIGKILL, stderr
    assert complete_steps(out) == [2]
    assert sorted(losses(out)) == [1, 2]

    code, stderr = fork_with_fault("kill-in-save", 4, argv(out), root / "killed-2.log")
    assert code == -signal.SIGKILL, stderr
    assert "resuming from" in stderr and "checkpoint-2: step 2, epoch 0.5" in stderr
    assert (out / "checkpoint-4").is_dir() and not is_complete(out / "checkpoint-4")  # the half-written one
    assert complete_steps(out) == [2]
    assert sorted(losses(out)) == [1, 2, 3, 4]

    with caplog.at_level(logging.INFO, logger="tuning"):
        run(parse_config(argv(out)))
    assert "removing incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    assert "checkpoint-2: step 2, epoch 0.5" in caplog.text
    assert complete_steps(out) == [2, 4, 6]
    assert_same_losses(losses(out), want)


def test_sigterm_finishes_the_step_saves_and_exits_143(job):
    root, argv, _, want = job
    out = root / "sigterm"

    code, stderr = fork_with_fault("sigterm-in-step", 3, argv(out), root / "sigterm.log")
    assert code == 143, stderr
    assert "interrupted: stopped by SIGTERM at step 3 after saving checkpoint-3" in stderr
    assert "stopped by SIGTERM" in (out / "error.log").read_text()  # the termination log
    assert complete_steps(out) == [2, 3]  # step 3 is no save step: the signal asked for it
    assert sorted(losses(out)) == [1, 2, 3]
    assert not (out / "run_summary.json").exists()

    run(parse_config(argv(out)))
    assert_same_losses(losses(out), want)


def test_resume_from_path_into_a_new_folder_and_save_model_dir_is_output_dir(job):
    root, argv, reference, want = job
    out = root / "from-path"
    checkpoint = reference / "checkpoint-4"  # an epoch boundary
    run(parse_config(argv(out, "--resume_from_checkpoint", str(checkpoint), "--save_model_dir", str(out))))
    assert_same_losses(losses(out), {5: want[5], 6: want[6]})
    assert complete_steps(out) == [6]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(root.glob(".from-path.tmp-*"))


def test_resume_false_starts_over_and_drops_the_old_history(job):
    root, argv, reference, want = job
    out = root / "start-over"
    shutil.copytree(reference, out)
    run(parse_config(argv(out, "--resume_from_checkpoint", "false", "--max_steps", "2")))
    got = losses(out)
    assert sorted(got) == [1, 2]  # the old run's steps 3-6 are gone from the log
    assert got[1] == pytest.approx(want[1], abs=1e-6)
    assert complete_steps(out) == [2]  # 4 and 6 belonged to the old run; auto-resume must not pick them
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["max_steps"] == 2


def test_best_model_survives_save_total_limit_1_and_is_the_saved_model(job, tiny_model_dir):
    root, argv, _, _ = job
    out = root / "best"
    validation = write_json(root / "validation.json", io_rows(1))
    extra = [
        *("--validation_data_path", str(validation), "--eval_strategy", "steps", "--eval_steps", "2"),
        *("--load_best_model_at_end", "true", "--metric_for_best_model", "loss"),
        # "best" = highest validation loss: the first evaluation, so best and newest differ
        *("--greater_is_better", "true", "--save_total_limit", "1", "--save_model_dir", str(out / "final")),
    ]
    run(parse_config(argv(out, *extra)))
    validation_losses = read_training_logs(out, "validation_loss")
    assert [r["step"] for r in validation_losses] == [2, 4, 6]
    values = [r["value"] for r in validation_losses]
    assert values[0] > values[1] > values[2]
    assert complete_steps(out) == [2, 6]  # the best (2) and the newest (6); 4 rotated away
    final = load_file(out / "final" / "model.safetensors")
    best = load_file(out / "checkpoint-2" / "model.safetensors")
    newest = load_file(out / "checkpoint-6" / "model.safetensors")
    name = "model.embed_tokens.weight"
    assert torch.equal(final[name], best[name]) and not torch.equal(final[name], newest[name])


# --- exact logs across a stop at any step; random kill -9 / SIGTERM moments -------------------------
#
# A second job where checkpoints carry a partial logging window: a line every 3 steps, a checkpoint every
# 4 (at each epoch's end, where its save follows the epoch's log line and evaluation) and at the end, 9
# steps of 4 per epoch (the last one mid-epoch), evaluation every 4, rotation to 2 checkpoints, a final
# model.


@pytest.fixture(scope="module")
def windows(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("windows")
    train = write_json(root / "train.json", io_rows(2))
    validation = write_json(root / "validation.json", io_rows(1)[:4])

    def argv(out, *extra: str) -> list[str]:
        return [
            *("--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(train)),
            *("--validation_data_path", str(validation), "--eval_strategy", "steps", "--eval_steps", "4"),
            *("--output_dir", str(out), "--torch_dtype", "float32", "--use_flash_attn", "false"),
            *("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"),
            *("--max_steps", "9", "--learning_rate", "1e-3", "--save_model_dir", str(out / "final")),
            *("--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "2"),
            *("--logging_strategy", "steps", "--logging_steps", "3", *extra),
        ]

    # the reference is a forked run that also counts the file operations of each phase, to draw moments
    reference, counts = root / "reference", root / "counts.json"
    code, output = fork_with_fault(
        "count", 0, argv(reference), root / "reference.log", {"FAULT_COUNTS": str(counts)}
    )
    assert code == 0, output
    return root, argv, reference, json.loads(counts.read_text())


def all_records(output_dir) -> list[tuple[str, int, float, float]]:
    """Every record of training_logs.jsonl but its timestamp, in file order."""
    path = output_dir / "training_logs.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [
        (r["name"], r["data"]["step"], r["data"]["epoch"], r["data"]["value"]) for r in map(json.loads, lines)
    ]


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(path)


def assert_same_run(out, reference) -> None:
    """The run in ``out`` is the uninterrupted one: every logged value bit for bit, the same weights,
    no debris (only complete, intact checkpoints; no other file than the reference run's but error.log)."""
    assert all_records(out) == all_records(reference)
    assert (
        tensors(out / "final" / "model.safetensors").keys()
        == tensors(reference / "final" / "model.safetensors").keys()
    )
    for name, value in tensors(reference / "final" / "model.safetensors").items():
        assert torch.equal(tensors(out / "final" / "model.safetensors")[name], value), name
    last = f"checkpoint-{max(complete_steps(reference))}"
    for name, value in tensors(reference / last / "model.safetensors").items():
        assert torch.equal(tensors(out / last / "model.safetensors")[name], value), name
    summary, want = (json.loads((d / "run_summary.json").read_text()) for d in (out, reference))
    for key in ("steps", "trained_tokens", "final_loss", "mean_train_loss", "best_validation_loss"):
        assert summary[key] == want[key], key

    def names(folder):
        return {p.name for p in folder.iterdir()} - {"error.log"}

    checkpoints = {p.name for p in out.glob("checkpoint-*")}
    assert names(out) - checkpoints == names(reference) - {p.name for p in reference.glob("checkpoint-*")}
    assert names(out / "final") == names(reference / "final")
    for name in checkpoints:
        assert is_complete(out / name) and verify_checkpoint(out / name) is None, name
        assert names(out / name) == names(reference / last), name


@pytest.mark.parametrize(
    ("logging", "stop_at"),
    [
        (("--logging_strategy", "steps", "--logging_steps", "2"), 7),  # between two log lines
        (("--logging_strategy", "epoch"), 6),  # mid-epoch, with the tool's default logging
        (("--logging_strategy", "steps", "--logging_steps", "2"), 9),  # the last step, mid-epoch
    ],
    ids=["every-2-steps-stop-at-7", "per-epoch-stop-at-6", "stop-at-the-last-step"],
)
def test_a_stop_between_log_lines_resumes_with_the_uninterrupted_log(windows, logging, stop_at):
    root, argv, _, _ = windows
    name = f"log-{stop_at}"
    reference, out = root / f"{name}-reference", root / name
    run(parse_config(argv(reference, *logging)))

    code, output = fork_with_fault("sigterm-in-step", stop_at, argv(out, *logging), root / f"{name}.log")
    assert code == 143, output
    marker = json.loads((out / f"checkpoint-{stop_at}" / COMPLETE_MARKER).read_text())
    assert marker["logging_window"]["loss_sum"][0] > 0  # the steps since the last line, carried
    assert all(step <= stop_at for _, step, _, _ in all_records(out))  # no epoch-end line at the stop
    run(parse_config(argv(out, *logging)))
    assert_same_run(out, reference)


def test_kill_9_and_sigterm_at_random_moments_resume_exactly_and_leave_no_debris(windows):
    """Five chains of faults on one output_dir each, one per phase of a run (a micro-batch, a checkpoint
    write, a deletion during rotation, the run's records, the final model save), each followed by two
    more random faults, then a clean rerun that must be the uninterrupted run. A chain's first fault
    always lands (a fresh run makes as many operations as the reference); later ones land if the
    resumed run gets that far. Moments are drawn from TUNING_FAULT_SEED (printed: rerun with it)."""
    root, argv, reference, counts = windows
    seed = int(os.environ.get("TUNING_FAULT_SEED", "1717"))
    rng = random.Random(seed)
    print(f"TUNING_FAULT_SEED={seed}; file operations per phase in one run: {counts}")
    phases = [p for p in ("step", "save", "rotation", "records", "final") if counts[p]]
    assert phases == ["step", "save", "rotation", "records", "final"], counts
    landed = []
    for chain, first in enumerate(phases):
        out = root / f"chain-{chain}"
        plan = [first, *rng.sample(phases, 2)]
        for i, phase in enumerate(plan):
            signame = rng.choice(["kill", "kill", "sigterm"])
            nth = rng.randint(1, counts[phase])
            code, output = fork_with_fault(
                f"{signame}@{phase}", nth, argv(out), root / f"chain-{chain}-{i}.log"
            )
            hit = next((line for line in output.splitlines() if line.startswith("fault:")), None)
            print(f"chain {chain} fault {i}: {signame}@{phase} #{nth} → exit {code}; {hit or 'not reached'}")
            assert code in (0, -signal.SIGKILL, -signal.SIGTERM, 143), output
            assert hit or i > 0, output  # a chain's first run is a fresh one: its moment exists
            landed.append(hit is not None)
        run(parse_config(argv(out)))
        assert_same_run(out, reference)
    assert sum(landed) >= len(phases) + 3, landed


# --- one writer per output_dir; nothing of an earlier run lost; checkpoints that don't fit ---------


def test_a_replacement_started_while_the_old_run_saves_waits_for_it_then_resumes(job, caplog):
    """The replacement pod starts while the old one still writes its SIGTERM checkpoint: it waits for
    the lock, then resumes from that checkpoint. (Without the lock it deleted the checkpoint being
    written, as a leftover of a killed save.)"""
    root, argv, _, want = job
    out = root / "replacement"
    old = start_with_fault("slow-save+sigterm-in-step", 3, argv(out), root / "replacement-old.log")
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-3").is_dir():  # the old run is inside its 4 s save now
        assert time.monotonic() < deadline, (root / "replacement-old.log").read_text()
        time.sleep(0.05)
    with caplog.at_level(logging.INFO, logger="tuning"):
        run(parse_config(argv(out)))
    code, output = finish(old, root / "replacement-old.log")
    assert code == 143, output
    assert "is in use by another run (pid" in caplog.text and "waiting up to 300 s" in caplog.text
    assert "checkpoint-3: step 3" in caplog.text
    assert_same_losses(losses(out), want)


def test_a_rerun_that_fails_or_is_killed_before_its_first_save_loses_nothing(job, capsys):
    root, argv, reference, want = job
    out = root / "keeps"
    shutil.copytree(reference, out)
    before = {name: (out / name).read_bytes() for name in ("training_logs.jsonl", "resolved_config.yaml")}

    assert main(argv(out, "--training_data_path", str(root / "missing.json"))) == 1  # fails at once
    code, output = fork_with_fault(  # starts over with other settings, killed before its first save
        "kill-in-step",
        2,
        argv(out, "--resume_from_checkpoint", "false", "--learning_rate", "5e-4"),
        root / "keeps.log",
    )
    assert code == -signal.SIGKILL, output
    assert {name: (out / name).read_bytes() for name in before} == before
    assert complete_steps(out) == [2, 4, 6]

    assert main(argv(out)) == 0  # the plain command: the old run's checkpoints and log still go together
    assert "resuming from" in capsys.readouterr().err
    assert_same_losses(losses(out), want)
    assert not (out / ".pending").exists()


def test_a_damaged_checkpoint_is_named_and_skipped_for_the_newest_intact_one(job, caplog, capsys):
    root, argv, reference, want = job
    out = root / "damaged"
    shutil.copytree(reference, out)
    model = out / "checkpoint-6" / "model.safetensors"
    os.truncate(model, model.stat().st_size // 2)

    assert main(argv(out, "--resume_from_checkpoint", str(out / "checkpoint-6"))) == 1
    err = capsys.readouterr().err
    assert f"error: --resume_from_checkpoint {out / 'checkpoint-6'} is damaged: model.safetensors is" in err

    with caplog.at_level(logging.WARNING):
        run(parse_config(argv(out)))
    assert "checkpoint-6 is damaged (model.safetensors is" in caplog.text
    assert "resuming from checkpoint-4, the newest intact checkpoint, instead" in caplog.text
    assert verify_checkpoint(out / "checkpoint-6") is None  # written again by this run
    assert_same_losses(losses(out), want)


def test_resuming_with_other_settings_is_refused_unless_the_checkpoint_is_named(job, caplog, capsys):
    root, argv, reference, _ = job
    out = root / "changed"
    shutil.copytree(reference, out)
    config = (out / "resolved_config.yaml").read_bytes()
    changed = argv(out, "--per_device_train_batch_size", "4", "--max_steps", "7")

    assert main(changed) == 1
    err = capsys.readouterr().err
    assert (
        "error: checkpoint-6 was written by a different run: effective_batch 4 (2 per device × 2 accumulated × "
        "1 processes) → 8 (4 per device × 2 accumulated × 1 processes). Rerun"
    ) in err
    assert f"pass --resume_from_checkpoint {out / 'checkpoint-6'} to continue from it anyway" in err
    assert (out / "resolved_config.yaml").read_bytes() == config

    with caplog.at_level(logging.WARNING):
        assert main([*changed, "--resume_from_checkpoint", str(out / "checkpoint-6")]) == 0
    assert "as asked, although it is not the same run: effective_batch 4 (2 per device" in caplog.text
    assert complete_steps(out) == [2, 4, 6, 7]


def test_resuming_onto_a_model_of_another_shape_is_a_user_error(job, tmp_path, capsys):
    root, argv, reference, _ = job
    other = write_tiny_model(tmp_path / "three-layers", num_hidden_layers=3)
    checkpoint = reference / "checkpoint-4"
    assert (
        main(
            argv(
                tmp_path / "out",
                "--model_name_or_path",
                str(other),
                "--resume_from_checkpoint",
                str(checkpoint),
            )
        )
        == 1
    )
    assert (
        "error: checkpoint-4 was written for a model with llama (2 layers, hidden size 32, vocabulary 362): "
        "41,760 parameters, 41,760 trainable; this model has llama (3 layers, hidden size 32, vocabulary 362)"
    ) in capsys.readouterr().err


def test_a_checkpoint_without_optimizer_state_resumes_only_under_save_only_model(job, caplog, capsys):
    root, argv, _, _ = job
    out = root / "model-only"
    assert main(argv(out, "--save_only_model", "true", "--max_steps", "2")) == 0
    assert main(argv(out, "--max_steps", "4")) == 1
    assert "checkpoint-2 was written by a different run: optimizer state: none" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING):
        assert main(argv(out, "--save_only_model", "true", "--max_steps", "4")) == 0
    assert (
        "checkpoint-2 has no optimizer state (--save_only_model): the optimizer starts afresh" in caplog.text
    )
    assert complete_steps(out) == [2, 4]
