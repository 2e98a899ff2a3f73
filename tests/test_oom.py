"""--oom_recovery: a micro-batch that runs out of memory is split by tokens and the step redone; the
weights equal an uninterrupted run's. The error is injected on CPU in the middle of a backward (after the
output head's and the last layer's gradients were added), in the second micro-batch of the second step."""

from __future__ import annotations

import datasets
import pytest
import torch

from tuning.config.args import TrainArgs
from tuning.data import DataStats, PreparedData
from tuning.errors import UserError
from tuning.model.loading import PrecisionPlan
from tuning.testing.tiny_model import build_model
from tuning.train.oom import split_by_tokens
from tuning.train.trainer import build_trainer

X = -100
ROWS = [
    {"input_ids": [1, *range(5, 5 + n)], "labels": [X] * (n + 1 - k) + list(range(5 + n - k, 5 + n))}
    for n, k in [(3, 1), (9, 7), (4, 2), (12, 1), (5, 5), (7, 3), (2, 1), (10, 6)] * 3
]


def _train(tmp_path, tokenizer, fail_when=None, padding_free=True):
    """Weights after 3 steps (4 samples × 2 micro-batches each); ``fail_when(trainer, inputs)`` says
    whether this micro-batch's backward runs out of memory."""
    data = PreparedData(datasets.Dataset.from_list(ROWS[:24]), None, "pretokenized", DataStats())
    args = TrainArgs(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        padding_free=padding_free,
        oom_recovery=True,
    )
    model = build_model(len(tokenizer))
    model.config.use_cache = False
    trainer = build_trainer(args, model, tokenizer, data, PrecisionPlan(torch.float32, None, torch.float32))
    armed = {"now": False}
    if fail_when is not None:
        step = trainer.plain_training_step

        def arming(model, inputs, *args, **kwargs):
            armed["now"] = fail_when(trainer, inputs)
            return step(model, inputs, *args, **kwargs)

        def backward_hook(*_):
            if armed["now"]:
                raise torch.OutOfMemoryError("injected: CUDA out of memory")

        trainer.plain_training_step = arming
        model.model.layers[0].register_full_backward_hook(backward_hook)
    trainer.train()
    return trainer, torch.cat([p.detach().flatten() for p in model.parameters()])


def _samples(inputs):
    return (
        int((inputs["position_ids"] == 0).sum()) if "position_ids" in inputs else inputs["input_ids"].shape[0]
    )


@pytest.mark.parametrize("padding_free", [True, False])
def test_a_split_step_equals_the_uninterrupted_one(tokenizer, tmp_path, caplog, padding_free):
    uninterrupted, reference = _train(tmp_path / "a", tokenizer, padding_free=padding_free)

    def second_micro_batch_of_step_2(trainer, inputs):
        batches = trainer.step_micro_batches
        in_step = any(inputs is b for b in batches[1:]) or any(
            inputs is p for p in trainer.split_micro_batches.get(id(batches[1]), [])
        )
        return trainer.state.global_step == 1 and in_step and _samples(inputs) > 1  # each half fits

    with caplog.at_level("WARNING", logger="tuning"):
        trainer, weights = _train(tmp_path / "b", tokenizer, second_micro_batch_of_step_2, padding_free)
    assert caplog.text.count("out of device memory in step 2") == 1  # one line for the step
    assert trainer.trained_tokens == sum(sum(1 for t in r["labels"][1:] if t != X) for r in ROWS[:24])
    assert (weights - reference).abs().max() < 1e-6
    # token accuracy counts each micro-batch once too (hits, trained tokens), though the step ran twice
    assert trainer.accuracy_counts["train"] == uninterrupted.accuracy_counts["train"]
    assert trainer.accuracy_counts["train"][1] == trainer.trained_tokens


def test_a_single_sample_that_does_not_fit_names_itself_and_a_flag(tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"single sample of \d+ tokens .*pass --gradient_checkpointing True"):
        _train(tmp_path, tokenizer, lambda trainer, inputs: trainer.state.global_step == 1)


def test_split_by_tokens():
    batch = {
        "input_ids": torch.arange(10).view(1, 10),
        "labels": torch.arange(10).view(1, 10),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]),
    }
    halves = split_by_tokens(batch)
    assert [h["position_ids"].tolist() for h in halves] == [[[0, 1, 2, 0, 1]], [[0, 1, 2, 3, 4]]]
    assert split_by_tokens({k: v[:, 5:] for k, v in batch.items()}) is None  # one sample
    padded = {
        "input_ids": torch.zeros(3, 4),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]),
    }
    assert [h["input_ids"].shape[0] for h in split_by_tokens(padded)] == [1, 2]


def test_flags_the_same_from_the_command_line_and_a_config_file(tmp_path):
    from tuning.config import parse_config

    base = ["--model_name_or_path", "m", "--training_data_path", "d.json", "--output_dir", str(tmp_path)]
    assert parse_config(base).train.oom_recovery is None  # on with CUDA (oom_recovery_enabled)
    flags = parse_config([*base, "--oom_recovery", "false", "--activation_offloading", "true"]).train
    config = tmp_path / "job.yaml"
    config.write_text("oom_recovery: false\nactivation_offloading: true\n")
    from_file = parse_config([*base, "--config", str(config)]).train
    assert (flags.oom_recovery, flags.activation_offloading) == (False, True)
    assert (from_file.oom_recovery, from_file.activation_offloading) == (False, True)
    for bad in ("--oom_recovery", "--activation_offloading"):
        with pytest.raises(UserError, match=f"{bad}: Truthy value expected"):
            parse_config([*base, bad, "maybe"])


RANK_SCRIPT = """
import os, sys, time
import torch, torch.distributed as dist
from tuning.train.oom import StopAllRanks
dist.init_process_group("gloo")
rank = dist.get_rank()
stop = StopAllRanks(rank, 2)
dist.barrier()
if rank == 1:
    class Args:
        gradient_checkpointing, per_device_train_batch_size = True, 4
    print(stop.stop({"input_ids": torch.zeros(4, 8, dtype=torch.long)}, 7, Args()), flush=True)
    time.sleep(60)  # alive: rank 0 must not learn of it from a broken connection
else:
    dist.all_reduce(torch.ones(1))  # rank 1 never joins: blocked here for good
print("rank 0 left the collective", flush=True)
"""


@pytest.mark.slow  # two fresh interpreters importing torch and transformers
def test_a_rank_blocked_in_a_collective_stops_when_another_runs_out_of_memory(tmp_path):
    """Two gloo processes: rank 1 posts its stop (as after an out-of-memory error) and stays alive; rank 0,
    blocked in an all-reduce rank 1 never joins, must end with exit 1 within seconds, silently."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env["WORLD_SIZE"] = "2"
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        started = time.monotonic()
        out, err = ranks[0].communicate(timeout=50)
        assert ranks[0].returncode == 1 and time.monotonic() - started < 40, err
        assert out == "" and "Traceback" not in err, (out, err)
        assert ranks[1].poll() is None  # rank 0 left because of the store, not because its peer died
        posted = ranks[1].stdout.readline()  # rank 1 goes on once rank 0 counted itself stopped
    finally:
        for rank in ranks:
            rank.kill()
            rank.communicate()
    assert posted == (
        "out of device memory at step 7 on rank 1, in a micro-batch of 32 tokens; with several processes "
        "--oom_recovery stops every rank (exit 1) instead of redoing the step; pass "
        "--per_device_train_batch_size 2 with twice the --gradient_accumulation_steps\n"
    )
