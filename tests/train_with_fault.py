"""Run the real CLI with one fault at an exact moment (tests only; kept out of the package on purpose).

    python tests/train_with_fault.py FAULT STEP CLI-ARGS...

FAULT is ``kill-in-step`` (SIGKILL after the first micro-batch of optimizer step STEP), ``kill-in-save``
(SIGKILL inside the save of ``checkpoint-STEP``, after the model and optimizer files, before the RNG
state and ``trainer_state.json``), ``sigterm-in-step`` (SIGTERM to itself at the same moment as
kill-in-step; the process must finish the step, save and exit 143), ``oom-in-step``
(``torch.OutOfMemoryError`` part-way through the forward of the second micro-batch of step STEP), or
``slow-save`` (the save of
``checkpoint-STEP`` takes 4 s longer: a pod still saving when its replacement starts). Faults combine
with ``+``: ``slow-save+sigterm-in-step 3``. The process signals itself, so
the fault lands at the same place on every machine, however loaded.

Moments anywhere in a run: ``SIGNAL@PHASE`` with STEP read as N (e.g. ``kill@rotation 2``) signals
the process just before the N-th file operation of that phase (see :data:`PHASES`), or, for ``step``,
right after the N-th micro-batch. ``count`` instead writes how many operations of each phase the run
makes to ``$FAULT_COUNTS`` (a JSON file), to draw moments from. Every fault prints the moment it hit.

Tests that don't need a fresh interpreter call :func:`inject` in a forked child instead (no import
cost).

Under ``accelerate launch`` every rank runs this script: ``FAULT_RANK=N`` limits the fault to global rank
N (default: every rank). ``none`` injects nothing; ``perturb-weights`` adds noise to every weight of the
model this rank builds (STEP unused). ``RECORD_DATA_PROCESSING=PATH`` makes every process that
tokenizes rows itself (rather than reading the datasets cache) append its rank to PATH.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import Trainer  # noqa: E402

from tuning.sft_trainer import main  # noqa: E402
from tuning.train import exit_process  # noqa: E402
from tuning.train.trainer import SFTTrainer  # noqa: E402

# phase → which file operations belong to it (by the path they touch)
PHASES = {
    "save": re.compile(r"/checkpoint-\d+(/|$)"),  # Hugging Face's files, the fsyncs, the marker
    "rotation": re.compile(r"/\.deleting-"),  # a deletion: rotation, replacing a folder, cleanup
    "records": re.compile(r"/(\.pending|training_logs\.jsonl|\.training_logs|resolved_config|\.run_summary)"),
    "final": re.compile(r"/\.?final(\.tmp-\d+)?(/|$)"),  # the final model (--save_model_dir .../final)
}
SIGNALS = {"kill": signal.SIGKILL, "sigterm": signal.SIGTERM}
SLOW_SAVE_SECONDS = 4.0
# the file operations a fault can land before: (module, name, index of the path argument)
OPERATIONS = [(os, "replace", 0), (os, "rename", 0), (os, "fsync", 0), (os, "unlink", 0), (os, "rmdir", 0)]


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


def _oom_in_step(step: int) -> None:
    """``torch.OutOfMemoryError`` in the middle of the forward of step ``step``'s second micro-batch, right
    after the first decoder layer (under FSDP the other rank then waits in the next layer's all-gather)."""
    original = SFTTrainer.plain_training_step
    seen = []

    def raise_oom(*_):
        raise torch.OutOfMemoryError("injected: CUDA out of memory")

    def plain_training_step(self, model, inputs, *args, **kwargs):
        if self.state.global_step + 1 == step:
            seen.append(1)
        if len(seen) != 2:
            return original(self, model, inputs, *args, **kwargs)
        layer = next(m for name, m in model.named_modules() if name.endswith("layers.0"))
        hook = layer.register_forward_hook(raise_oom)
        try:
            return original(self, model, inputs, *args, **kwargs)
        finally:
            hook.remove()

    SFTTrainer.plain_training_step = plain_training_step


def _in_save(step: int, action) -> None:
    original = Trainer._save_rng_state

    def save_rng_state(self, output_dir):
        if self.state.global_step == step:
            action()
        return original(self, output_dir)

    Trainer._save_rng_state = save_rng_state


def _path_of(arg, kwargs) -> str:
    """The path an ``os`` call touches: file descriptors and ``dir_fd`` names resolved via /proc."""
    if isinstance(arg, int):
        try:
            return os.readlink(f"/proc/self/fd/{arg}")
        except OSError:
            return ""
    path = os.fsdecode(arg)
    dir_fd = kwargs.get("dir_fd")
    if dir_fd is not None:
        try:
            return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        except OSError:
            return path
    return os.path.abspath(path)


class _Moments:
    """Counts the operations of each phase; signals the process at the chosen one."""

    def __init__(
        self, phase: str | None, nth: int, signum: int | None, counts_file: str | None = None
    ) -> None:
        self.phase, self.nth, self.signum = phase, nth, signum
        self.counts = {name: 0 for name in [*PHASES, "step"]}
        self.counts_file = counts_file
        self.fired = False

    def hit(self, phase: str, what: str) -> None:
        self.counts[phase] += 1
        if self.counts_file:  # at every operation: a forked run ends with os._exit, past atexit
            Path(self.counts_file).write_text(json.dumps(self.counts))
        if phase == self.phase and self.counts[phase] == self.nth and not self.fired:
            self.fired = True
            name = signal.Signals(self.signum).name
            print(f"fault: {name} at {phase} operation {self.nth}: {what}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), self.signum)

    def wrap(self, module, name: str, index: int) -> None:
        original = getattr(module, name)

        def operation(*args, **kwargs):
            path = _path_of(args[index], kwargs) if len(args) > index else ""
            for phase, pattern in PHASES.items():
                if pattern.search(path):
                    self.hit(phase, f"{module.__name__}.{name}({path})")
                    break
            return original(*args, **kwargs)

        setattr(module, name, operation)

    def install(self) -> None:
        for module, name, index in OPERATIONS:
            self.wrap(module, name, index)
        self.wrap(torch, "save", 1)  # optimizer, scheduler, RNG state
        original_step = SFTTrainer.training_step
        moments = self

        def training_step(trainer, *args, **kwargs):
            loss = original_step(trainer, *args, **kwargs)
            moments.hit(
                "step", f"micro-batch {moments.counts['step'] + 1} (step {trainer.state.global_step + 1})"
            )
            return loss

        SFTTrainer.training_step = training_step


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
    if fault == "perturb-weights":
        _perturb_weights()
    elif fault == "kill-in-step":
        _signal_in_step(step, signal.SIGKILL)
    elif fault == "sigterm-in-step":
        _signal_in_step(step, signal.SIGTERM)
    elif fault == "oom-in-step":
        _oom_in_step(step)
    elif fault == "kill-in-save":
        _in_save(step, lambda: os.kill(os.getpid(), signal.SIGKILL))
    elif fault == "slow-save":
        _in_save(step, lambda: time.sleep(SLOW_SAVE_SECONDS))
    elif fault == "count":
        _Moments(None, 0, None, counts_file=os.environ["FAULT_COUNTS"]).install()
    elif "@" in fault and fault.split("@")[0] in SIGNALS and fault.split("@")[1] in [*PHASES, "step"]:
        name, phase = fault.split("@")
        _Moments(phase, step, SIGNALS[name]).install()
    else:
        raise ValueError(f"unknown fault {fault}")


if __name__ == "__main__":
    for one in sys.argv[1].split("+"):
        inject(one, int(sys.argv[2]))
    code = main(sys.argv[3:])
    if os.environ.get("WORLD_SIZE", "1") != "1":  # a rank under accelerate launch: as sft_trainer's own main
        exit_process(code)
    sys.exit(code)
