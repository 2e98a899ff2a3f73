"""Two processes on CPU (gloo) through ``accelerate launch`` with the shipped FSDP fixture.

Equivalence, not just "it runs": a 2-process job with global batch 8 (2 per rank x 2 accumulation x 2
ranks) must end at the loss of a 1-process job with global batch 8 (4 x 2). Both see the same 8 rows
per optimizer step in the same order (accelerate hands batch i to rank i mod 2), and the loss is a
token-weighted mean, so the only difference is float32 summation order in the gradient reduce-scatter:
relative error ~1e-7 per step (measured: final losses equal to the last bit, epoch 1 differs by 1e-6).
The tolerance, 1e-4 absolute on a loss of ~5.5, is 100x that and far below what one step at lr 1e-3
moves the loss (> 0.05), so a run that skipped or doubled a step fails.

The 2-process runs are the slowest tests in the suite: a few launches each, tiny model, 12 steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import REPO, text_rows, write_json
from tuning import sft_trainer
from tuning.train import read_eval_generations, read_training_logs
from tuning.train.distributed import select_cpu_backend

FIXTURE = REPO / "fixtures" / "accelerate_fsdp_defaults.yaml"
TOLERANCE = 1e-4  # see the module docstring
TINY_PARAMETERS = 41760  # the tiny Llama: what one rank holds unsharded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_args(model_dir: Path, data: Path, out: Path, per_device: int, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(model_dir),
        "--training_data_path",
        str(data),
        "--output_dir",
        str(out),
        "--dataset_text_field",
        "output",
        "--response_template",
        "\n### Label:",
        "--torch_dtype",
        "float32",
        "--num_train_epochs",
        "3",
        "--per_device_train_batch_size",
        str(per_device),
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--save_model_dir",
        str(out / "final"),
        *extra,
    ]


def accelerate_launch(
    entry: list[str], args: list[str], *launch: str, **env: str
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FIXTURE), *launch]
    cmd += ["--num_processes", "2", "--main_process_port", str(free_port()), *entry, *args]
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=environment)


def final_losses(out: Path) -> list[float]:
    return [r["value"] for r in read_training_logs(out)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_json(tmp_path_factory.mktemp("fsdp-data") / "data.json", text_rows())  # 32 rows


def test_cpu_backend_selected_only_for_a_multi_process_fsdp_launch(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "1")
    select_cpu_backend()
    assert "ACCELERATE_USE_CPU" not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")
    select_cpu_backend()
    assert os.environ.get("ACCELERATE_USE_CPU") == (None if torch.accelerator.is_available() else "true")


def test_fixture_is_fsdp2_full_shard_by_decoder_layer():
    fsdp = yaml.safe_load(FIXTURE.read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp  # taken from the model's _no_split_modules
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.slow
def test_full_finetuning_on_two_processes_shards_and_matches_one(tmp_path, tiny_model_dir, data):
    one, two = tmp_path / "one", tmp_path / "two"
    # evaluations too: token accuracy summed over ranks, generations with the weights gathered (FSDP2)
    evaluation = [
        "--validation_data_path",
        str(data),
        "--eval_strategy",
        "epoch",
        "--per_device_eval_batch_size",
        "4",
    ]
    evaluation += ["--eval_generations", "2", "--eval_max_new_tokens", "4"]
    assert sft_trainer.main(training_args(tiny_model_dir, data, one, 4, *evaluation)) == 0
    result = accelerate_launch(
        [str(REPO / "tuning" / "sft_trainer.py")], training_args(tiny_model_dir, data, two, 2, *evaluation)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # If this fails, accelerate now routes CPU + FSDP itself: drop route_cpu_fsdp (tuning/train/distributed.py).
    assert "accelerate chose MULTI_CPU (DDP) for an FSDP launch on CPU: routing it to FSDP" in result.stderr
    # really sharded: each rank holds half of the parameters, not a full replica (DDP would say 41760 twice)
    assert f"parameters held per rank {TINY_PARAMETERS // 2}, {TINY_PARAMETERS // 2}" in result.stderr

    losses_one, losses_two = final_losses(one), final_losses(two)
    assert len(losses_two) == 3  # rank 0 alone writes training_logs.jsonl: one line per epoch, not two
    assert losses_two == pytest.approx(losses_one, abs=TOLERANCE)
    assert losses_two[-1] < losses_two[0] - 0.1
    accuracy = [[r["mean_token_accuracy"] for r in read_training_logs(o)] for o in (one, two)]
    assert accuracy[1] == pytest.approx(accuracy[0], abs=1e-6) and len(set(accuracy[0])) > 1
    validation = [read_training_logs(o, "validation_loss") for o in (one, two)]
    assert [r["mean_token_accuracy"] for r in validation[1]] == [
        r["mean_token_accuracy"] for r in validation[0]
    ]
    assert [r["window_trained_tokens"] for r in validation[1]] == [
        r["window_trained_tokens"] for r in validation[0]
    ]
    generations = [[(r["step"], r["generation"]) for r in read_eval_generations(o)] for o in (one, two)]
    assert generations[1] == generations[0] and len(generations[0]) == 6  # 2 prompts x 3 evaluations
    summary = json.loads((two / "run_summary.json").read_text())
    assert summary["steps"] == 12  # 32 rows x 3 epochs / global batch 8
    assert summary["trained_tokens"] == json.loads((one / "run_summary.json").read_text())["trained_tokens"]

    # the final folder is an ordinary unsharded model, equal to the 1-process one
    saved_one, saved_two = (
        load_file(one / "final" / "model.safetensors"),
        load_file(two / "final" / "model.safetensors"),
    )
    assert saved_two.keys() == saved_one.keys()
    assert max((saved_two[k] - saved_one[k]).abs().max().item() for k in saved_one) < 1e-4
    model = AutoModelForCausalLM.from_pretrained(two / "final")
    assert sum(p.numel() for p in model.parameters()) == TINY_PARAMETERS
    assert not list(two.glob(".final.tmp-*"))
    assert "loss: label_only (auto: llama is verified)" in result.stderr


@pytest.mark.slow
def test_label_only_loss_under_fsdp_equals_the_standard_loss(tmp_path, tiny_model_dir, data):
    """The label-only loss on sharded weights (the head gathered by FSDP's own hooks) trains exactly what
    the model's own loss trains on the same engine: per-step losses and final weights."""
    runs = {}
    for loss in ("label_only", "standard"):
        out = tmp_path / loss
        args = training_args(tiny_model_dir, data, out, 2, "--num_train_epochs", "1", "--logging_steps", "1")
        result = accelerate_launch(["-m", "tuning.sft_trainer"], [*args, "--loss_implementation", loss])
        assert result.returncode == 0, result.stderr[-3000:]
        assert (
            f"loss: {loss} (asked for)" in result.stderr and "FSDP: parameters held per rank" in result.stderr
        )
        runs[loss] = (final_losses(out), load_file(out / "final" / "model.safetensors"))
    (losses, weights), (standard_losses, standard_weights) = runs["label_only"], runs["standard"]
    assert len(losses) == 4 and losses == pytest.approx(standard_losses, abs=1e-6)
    assert max((weights[k] - standard_weights[k]).abs().max().item() for k in weights) < 1e-6


def _kill_tree_after(proc: subprocess.Popen, marker: Path, timeout: float = 240) -> None:
    """SIGKILL every process under ``proc`` (accelerate, the ranks) once ``marker`` exists."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.send_signal(signal.SIGKILL)


@pytest.mark.slow
def test_lora_run_killed_after_a_checkpoint_resumes_exactly(tmp_path, tiny_model_dir, data):
    """Through ``tuning launch`` (which applies the FSDP fixture by itself for 2 processes): a rank
    killed mid-run is an internal failure (203, no ``.complete``); the same job again resumes from the
    committed checkpoint and ends exactly where an uninterrupted run ends."""
    # no dropout: its masks are drawn per rank, so 2 ranks could never equal 1 process bit for bit
    lora = ("--peft_method", "lora", "--lora_dropout", "0", "--learning_rate", "1e-2")
    reference = tmp_path / "reference"
    assert sft_trainer.main(training_args(tiny_model_dir, data, reference, 4, *lora)) == 0

    out = tmp_path / "two"
    flags = training_args(tiny_model_dir, data, out, 2, *lora)
    job = {key.removeprefix("--"): value for key, value in zip(flags[::2], flags[1::2], strict=True)}
    job["accelerate_launch_args"] = {"num_processes": 2, "main_process_port": free_port()}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    launcher = [sys.executable, "-m", "tuning.launch", str(job_file)]

    first = subprocess.Popen(launcher, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_tree_after(first, out / "checkpoint-4" / "checkpoint_complete.json")
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 203, stderr[-3000:]
    assert not (out / ".complete").exists() and not (out / "final").exists()

    second = subprocess.run(launcher, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resum" in second.stderr and "checkpoint-4" in second.stderr
    assert (out / ".complete").is_file()
    assert final_losses(out)[-1] == pytest.approx(final_losses(reference)[-1], abs=TOLERANCE)
    # adapter only, in the final folder and in every checkpoint: the base model is never copied
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert not (out / "final" / "model.safetensors").exists()
    for checkpoint in out.glob("checkpoint-*"):
        assert not (checkpoint / "model.safetensors").exists(), checkpoint


# the seed's gpt-oss FSDP settings (docs/gpt-oss.md) on top of the shipped fixture
GPT_OSS_FSDP = ("--fsdp_use_orig_params", "true", "--fsdp_cpu_ram_efficient_loading", "true")
GPT_OSS_FSDP += ("--fsdp_sync_module_states", "true")
# the seed's recipe, scaled to the tiny model: LoRA on all linear layers, no dropout, checkpointing, MXFP4
GPT_OSS_RECIPE = ("--peft_method", "lora", "--target_modules", "all-linear", "--lora_r", "8")
GPT_OSS_RECIPE += ("--lora_alpha", "16", "--lora_dropout", "0.0", "--gradient_checkpointing", "True")
GPT_OSS_RECIPE += ("--quantization_method", "mxfp4", "--dequantize", "True", "--learning_rate", "1e-2")


@pytest.mark.slow
def test_gpt_oss_lora_recipe_under_fsdp_matches_one_process(tmp_path, data, monkeypatch):
    """The seed's gpt-oss recipe on two ranks. Rank 1 perturbs every weight it built (base and adapter):
    only rank 0's weights broadcast by fsdp_sync_module_states / cpu_ram_efficient_loading make the
    two ranks train the model the 1-process run trains, and the losses say whether they did."""
    from peft import PeftModel
    from transformers import Mxfp4Config

    from tests.conftest import run_keeping_model
    from tuning.testing.tiny_gpt_oss import write_tiny_gpt_oss

    gpt_oss = write_tiny_gpt_oss(tmp_path / "gpt-oss")
    one, two = tmp_path / "one", tmp_path / "two"
    code, model_one = run_keeping_model(monkeypatch, training_args(gpt_oss, data, one, 4, *GPT_OSS_RECIPE))
    assert code == 0
    script = [str(REPO / "tests" / "train_with_fault.py"), "perturb-weights", "0"]
    args = training_args(gpt_oss, data, two, 2, *GPT_OSS_RECIPE)
    result = accelerate_launch(script, args, *GPT_OSS_FSDP, FAULT_RANK="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "routing it to FSDP" in result.stderr and "parameters held per rank" in result.stderr
    assert "GptOssModel builds its eager attention mask without position_ids" in result.stderr

    assert final_losses(two) == pytest.approx(final_losses(one), abs=TOLERANCE)
    assert final_losses(two)[-1] < final_losses(two)[0] - 0.1
    # the adapter alone, once, in the final folder and in every checkpoint
    assert sorted(p.name for p in (two / "final").glob("*.safetensors")) == ["adapter_model.safetensors"]
    assert not list(tmp_path.glob("**/.final.tmp-*"))
    for checkpoint in two.glob("checkpoint-*"):
        assert not (checkpoint / "model.safetensors").exists(), checkpoint
    # plain peft loads it onto the dequantized base, and it computes what the 1-process adapter computes
    base = AutoModelForCausalLM.from_pretrained(gpt_oss, quantization_config=Mxfp4Config(dequantize=True))
    reloaded = PeftModel.from_pretrained(base, two / "final").eval()
    ids = torch.tensor([[1, 55, 72, 69, 82, 4, 102, 4, 48]])
    model_one.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model_one(input_ids=ids).logits, atol=1e-4)


@pytest.mark.slow
def test_two_ranks_stopped_between_log_lines_resume_with_the_uninterrupted_log(
    tmp_path, tiny_model_dir, data
):
    """Each rank carries its own share of the logging window in the checkpoint: after a SIGTERM at step
    7 (lines every 3 steps), the resumed 2-rank run logs what the uninterrupted 2-rank run logs."""
    every_3 = (
        "--logging_strategy",
        "steps",
        "--logging_steps",
        "3",
        "--save_strategy",
        "steps",
        "--save_steps",
        "5",
    )
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    entry = ["-m", "tuning.sft_trainer"]
    done = accelerate_launch(entry, training_args(tiny_model_dir, data, reference, 2, *every_3))
    assert done.returncode == 0, done.stderr[-3000:]

    fault = [str(REPO / "tests" / "train_with_fault.py"), "sigterm-in-step", "7"]
    stopped = accelerate_launch(fault, training_args(tiny_model_dir, data, out, 2, *every_3))
    assert "stopped by SIGTERM at step 7 after saving checkpoint-7" in stopped.stderr, stopped.stderr[-3000:]
    marker = json.loads((out / "checkpoint-7" / "checkpoint_complete.json").read_text())
    assert (
        marker["logging_window"]["last_logged_step"] == 6 and len(marker["logging_window"]["loss_sum"]) == 2
    )

    resumed = accelerate_launch(entry, training_args(tiny_model_dir, data, out, 2, *every_3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [r["step"] for r in read_training_logs(out)]
    assert steps == [3, 6, 9, 12] == [r["step"] for r in read_training_logs(reference)]
    assert final_losses(out) == pytest.approx(final_losses(reference), abs=1e-6)
    # the token accuracy window is carried like the loss's: the line after the resume counts all its steps
    records = [read_training_logs(o) for o in (out, reference)]
    assert [r["window_trained_tokens"] for r in records[0]] == [
        r["window_trained_tokens"] for r in records[1]
    ]
    assert [r["mean_token_accuracy"] for r in records[0]] == pytest.approx(
        [r["mean_token_accuracy"] for r in records[1]], abs=1e-6
    )


@pytest.mark.slow
def test_out_of_memory_on_one_rank_stops_every_rank_with_one_line(tmp_path, tiny_model_dir, data):
    """Rank 1 runs out of memory part-way through a forward (after its first decoder layer) in step 2;
    rank 0 is then blocked in FSDP's all-gather of the next layer, which rank 1 never joins. Both ranks
    must end with exit 1 (not hang until the collective's timeout), and the job's stderr carries the
    one line naming the rank, the step and a flag."""
    fault = [str(REPO / "tests" / "train_with_fault.py"), "oom-in-step", "2"]
    args = training_args(tiny_model_dir, data, tmp_path / "out", 2, "--oom_recovery", "true")
    started = time.monotonic()
    result = accelerate_launch(fault, args, FAULT_RANK="1")
    assert time.monotonic() - started < 120, "a rank waited in a collective"
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: out of device memory")]
    assert lines == [
        "error: out of device memory at step 2 on rank 1, in a micro-batch of "
        + lines[0].split("micro-batch of ")[1].split(" tokens")[0]
        + " tokens; with several processes --oom_recovery stops every rank (exit 1) instead of redoing the "
        "step; pass --gradient_checkpointing True"
    ], result.stderr[-3000:]
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr.split(lines[0])[0]
