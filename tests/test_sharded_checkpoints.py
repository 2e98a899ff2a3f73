"""``fsdp_state_dict_type: SHARDED_STATE_DICT``: every rank writes its own shard of each checkpoint
(torch.distributed.checkpoint through accelerate), the completion marker is written once every rank has
finished, and the final model is still one ordinary safetensors folder.

One job, three launches, against a 1-process reference with the same global batch (8 rows per step):

1. 2 processes; rank 1 alone is SIGKILLed inside the save of checkpoint-8, after writing its model and
   optimizer shards (rank 0 carries on and writes its part): checkpoint-8 must not look complete.
2. 4 processes (1 row per rank, same global batch): the rerun discards nothing complete, resumes from the
   sharded checkpoint-4 written by 2 processes (torch.distributed.checkpoint reshards it), and is
   SIGKILLed whole once its checkpoint-12 is committed.
3. 2 processes again: resumes checkpoint-12 (written by 4), ends with the reference's loss at every
   step, and its final model loads with plain transformers and equals the reference's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import REPO, text_rows, write_json
from tests.test_distributed import TOLERANCE, free_port
from tests.test_multinode import assert_losses_match, complete_steps, losses
from tuning import sft_trainer
from tuning.errors import UserError
from tuning.train.checkpoint_format import (
    COMPLETE_MARKER,
    checkpoint_layout,
    checkpoint_world_size,
    is_complete,
)
from tuning.train.resume import check_resumable

FIXTURE = REPO / "fixtures" / "accelerate_fsdp_defaults.yaml"
FAULT_SCRIPT = REPO / "tests" / "train_with_fault.py"
STEPS, SAVE_STEPS = 16, 4


def flags(model_dir: Path, data: Path, out: Path, per_device: int) -> list[str]:
    return [
        *("--model_name_or_path", str(model_dir), "--training_data_path", str(data)),
        *("--output_dir", str(out), "--dataset_text_field", "output", "--response_template", "\n### Label:"),
        *("--torch_dtype", "float32", "--max_steps", str(STEPS), "--learning_rate", "1e-3"),
        *("--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", "2"),
        *("--logging_steps", "1", "--save_steps", str(SAVE_STEPS), "--save_model_dir", str(out / "final")),
    ]


def launch(processes: int, args: list[str], log: Path, fault: tuple[str, int] = ("none", 0), **env: str):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FIXTURE)]
    cmd += ["--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--num_processes", str(processes)]
    cmd += ["--main_process_port", str(free_port()), str(FAULT_SCRIPT), fault[0], str(fault[1]), *args]
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=environment, stdout=f, stderr=subprocess.STDOUT)


def rank_files(checkpoint: Path, rank: int) -> list[str]:
    return sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob(f"__{rank}_*.distcp"))


@pytest.mark.slow
def test_sharded_checkpoints_survive_kills_and_resume_across_world_sizes(tmp_path, tiny_model_dir):
    data = write_json(tmp_path / "data.json", text_rows())
    reference = tmp_path / "reference"
    assert sft_trainer.main(flags(tiny_model_dir, data, reference, 4)) == 0
    want = losses(reference)
    out = tmp_path / "sharded"

    # 1. rank 1 dies in the middle of saving checkpoint-8
    first = launch(
        2, flags(tiny_model_dir, data, out, 2), tmp_path / "1.log", ("kill-in-save", 8), FAULT_RANK="1"
    )
    assert first.wait(timeout=300) != 0
    log = (tmp_path / "1.log").read_text()
    assert complete_steps(out) == [4], log[-3000:]
    checkpoint = out / "checkpoint-4"
    assert checkpoint_layout(checkpoint) == "fsdp-sharded" and checkpoint_world_size(checkpoint) == 2
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # one shard per rank, nothing gathered on rank 0
        assert sorted(p.name for p in (checkpoint / part).iterdir()) == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
        ]
    assert not (checkpoint / "model.safetensors").exists()
    half = out / "checkpoint-8"
    # rank 1 wrote its model and optimizer shards before it died
    assert rank_files(half, 1) == ["optimizer_0/__1_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"]
    assert not is_complete(half) and not (half / COMPLETE_MARKER).exists()

    # 2. four processes resume the 2-process checkpoint-4; kill -9 of everything after checkpoint-12
    second = launch(4, flags(tiny_model_dir, data, out, 1), tmp_path / "2.log")
    deadline = time.monotonic() + 300
    while not is_complete(out / "checkpoint-12"):
        assert second.poll() is None, (tmp_path / "2.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint-12 in time"
        time.sleep(0.05)
    tree = psutil.Process(second.pid)
    for proc in [tree, *tree.children(recursive=True)]:
        proc.send_signal(signal.SIGKILL)
    second.wait(timeout=60)
    log = (tmp_path / "2.log").read_text()
    assert "resuming from" in log and "checkpoint-4: step 4" in log
    assert "resuming a checkpoint of 2 processes on 4" in log
    assert checkpoint_world_size(out / "checkpoint-12") == 4
    assert rank_files(out / "checkpoint-12", 3) == [
        "optimizer_0/__3_0.distcp",
        "pytorch_model_fsdp_0/__3_0.distcp",
    ]

    # 3. back on two processes: resume checkpoint-12 (written by 4) and finish
    third = launch(2, flags(tiny_model_dir, data, out, 2), tmp_path / "3.log")
    assert third.wait(timeout=300) == 0, (tmp_path / "3.log").read_text()[-3000:]
    log = (tmp_path / "3.log").read_text()
    assert "checkpoint-12: step 12" in log and "resuming a checkpoint of 4 processes on 2" in log
    assert_losses_match(losses(out), want)

    # the final model is gathered into one ordinary folder that plain transformers loads
    final = out / "final"
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    saved, expected = (
        load_file(final / "model.safetensors"),
        load_file(reference / "final" / "model.safetensors"),
    )
    assert saved.keys() == expected.keys()
    assert max((saved[k] - expected[k]).abs().max().item() for k in expected) < TOLERANCE
    model = AutoModelForCausalLM.from_pretrained(final)
    assert torch.equal(model.model.embed_tokens.weight.detach(), saved["model.embed_tokens.weight"])


def test_layouts_and_resume_checks(tmp_path):
    plain, sharded, full, zero = (tmp_path / n for n in ("plain", "sharded", "full", "zero"))
    (sharded / "pytorch_model_fsdp_0").mkdir(parents=True)
    full.mkdir()
    (full / "pytorch_model_fsdp.bin").write_bytes(b"")
    (zero / "global_step8").mkdir(parents=True)
    plain.mkdir()
    for folder, ranks in ((sharded, 2), (full, 4), (zero, 2)):
        for rank in range(ranks):
            (folder / f"rng_state_{rank}.pth").write_bytes(b"")
    (plain / "rng_state.pth").write_bytes(b"")
    assert [checkpoint_layout(p) for p in (plain, sharded, full, zero)] == [
        "plain",
        "fsdp-sharded",
        "fsdp-full",
        "deepspeed",
    ]
    assert [checkpoint_world_size(p) for p in (plain, sharded, full, zero)] == [1, 2, 4, 2]

    check_resumable(str(sharded), fsdp=True, deepspeed=False, world_size=8)  # FSDP reshards: fine
    check_resumable(str(full), fsdp=True, deepspeed=False, world_size=2)
    check_resumable(str(plain), fsdp=True, deepspeed=False, world_size=2)  # an ordinary model folder
    check_resumable(str(zero), fsdp=False, deepspeed=True, world_size=2)
    check_resumable(None, fsdp=False, deepspeed=False, world_size=1)
    with pytest.raises(
        UserError, match=r"written under FSDP and this run uses neither; resume it with accelerate"
    ):
        check_resumable(str(sharded), fsdp=False, deepspeed=False, world_size=1)
    with pytest.raises(UserError, match="written under DeepSpeed and this run uses FSDP"):
        check_resumable(str(zero), fsdp=True, deepspeed=False, world_size=2)
    with pytest.raises(UserError, match="written without FSDP or DeepSpeed and this run uses DeepSpeed"):
        check_resumable(str(plain), fsdp=False, deepspeed=True, world_size=1)
    with pytest.raises(UserError, match="DeepSpeed checkpoint of 2 processes and this run has 4"):
        check_resumable(str(zero), fsdp=False, deepspeed=True, world_size=4)


def test_save_on_each_node_refuses_sharded_checkpoints_across_machines(monkeypatch):
    from types import SimpleNamespace

    from tuning.train.distributed import check_checkpoint_storage

    def accelerator(state_dict_type: str, processes: int):
        plugin = SimpleNamespace(state_dict_type=f"StateDictType.{state_dict_type}")
        return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), num_processes=processes)

    each_node, shared = SimpleNamespace(save_on_each_node=True), SimpleNamespace(save_on_each_node=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(UserError, match="cannot hold sharded checkpoints"):
        check_checkpoint_storage(each_node, accelerator("SHARDED_STATE_DICT", 16), fsdp=True)
    check_checkpoint_storage(each_node, accelerator("SHARDED_STATE_DICT", 8), fsdp=True)  # one machine
    check_checkpoint_storage(each_node, accelerator("FULL_STATE_DICT", 16), fsdp=True)  # gathered: fine
    check_checkpoint_storage(shared, accelerator("SHARDED_STATE_DICT", 16), fsdp=True)
