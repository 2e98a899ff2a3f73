"""Run the real CLI with one fault at an exact moment (tests only; kept out of the package on purpose).

    python tests/train_with_fault.py FAULT STEP CLI-ARGS...

FAULT is ``kill-in-step`` (SIGKILL after the first micro-batch of optimizer step STEP), ``kill-in-save``
(SIGKILL inside the save of ``checkpoint-STEP``, after the model and optimizer files, before the RNG
state and ``trainer_state.json``), ``sigterm-in-step`` (SIGTERM to itself at the same moment as
kill-in-step; the process must finish the step, save and exit 143), or ``perturb-weights`` (noise on
every weight of the model it builds; STEP unused). The process signals itself, so
the fault lands at the same place on every machine, however loaded. Tests that don't need a fresh
interpreter call :func:`inject` in a forked child instead (no import cost).

Under ``accelerate launch`` every rank runs this script: ``FAULT_RANK=N`` limits the fault to global rank
N (default: every rank). ``none`` injects nothing. ``RECORD_DATA_PROCESSING=PATH`` makes every process
that tokenizes rows itself (rather than reading the datasets cache) append its rank to PATH.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import Trainer  # noqa: E402

from tuning.sft_trainer import main  # noqa: E402
from tuning.train.distributed import exit_process  # noqa: E402
from tuning.train.trainer import SFTTrainer  # noqa: E402


def _signal_in_step(step: int, signum: int) -> None:
    original = SFTTrainer.training_step
    sent = []

    def training_step(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        if self.state.global_step + 1 == step and not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return loss

    SFTTrainer.training_step = training_step


def _kill_in_save(step: int) -> None:
    original = Trainer._save_rng_state

    def save_rng_state(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)

    Trainer._save_rng_state = save_rng_state


def _record_data_processing(path: str) -> None:
    """Patch what ``prepare.process_batch`` calls (not the mapped function itself: its hash names the
    datasets cache file, which must stay the same as without this patch)."""
    from tuning.data import prepare

    original = prepare.tokenize_batch

    def tokenize_batch(*args, **kwargs):
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{os.environ.get('RANK', '0')}\n")
        return original(*args, **kwargs)

    prepare.tokenize_batch = tokenize_batch


def _perturb_weights() -> None:
    """Add noise to this rank's freshly built model (adapters included): only a broadcast of rank 0's
    weights (``fsdp_sync_module_states``/``fsdp_cpu_ram_efficient_loading``) makes the ranks agree again."""
    import torch

    import tuning.sft_trainer as entry

    original = entry.apply_peft

    def apply_peft(*args):
        model = original(*args)
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point() and p.device.type != "meta":
                    p.add_(torch.randn_like(p))
        return model

    entry.apply_peft = apply_peft


def inject(fault: str, step: int) -> None:
    """Patch this process so that ``fault`` happens at ``step`` (see the module docstring)."""
    if os.environ.get("RECORD_DATA_PROCESSING"):
        _record_data_processing(os.environ["RECORD_DATA_PROCESSING"])
    if fault == "none" or os.environ.get("FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get(
        "RANK", "0"
    ):
        return
    if fault == "kill-in-step":
        _signal_in_step(step, signal.SIGKILL)
    elif fault == "sigterm-in-step":
        _signal_in_step(step, signal.SIGTERM)
    elif fault == "kill-in-save":
        _kill_in_save(step)
    elif fault == "perturb-weights":
        _perturb_weights()
    else:
        raise ValueError(f"unknown fault {fault}")


if __name__ == "__main__":
    inject(sys.argv[1], int(sys.argv[2]))
    code = main(sys.argv[3:])
    if os.environ.get("WORLD_SIZE", "1") != "1":  # a rank: exit as tuning/sft_trainer.py does
        exit_process(code)
    sys.exit(code)
