"""Pins every private ``transformers.Trainer`` surface ``tuning/train/hf_private.py`` relies on.

When one of these fails, transformers changed that method: the failure names it. Update hf_private.py
(and only it), then this test. The behaviour checks train a three-weight linear model on CPU.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
import transformers.trainer
from transformers import Trainer, TrainerCallback, TrainingArguments

from tuning.train import hf_private

EXPECTED_SIGNATURES = {
    "_save_checkpoint": ["self", "model", "trial"],
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
    "_run_epoch": [
        "self",
        "model",
        "epoch",
        "train_dataloader",
        "steps_in_epoch",
        "num_update_steps_per_epoch",
        "trial",
        "ignore_keys_for_eval",
        "start_time",
        "resume_from_checkpoint",
        "epochs_trained",
        "steps_trained_in_current_epoch",
    ],
    "get_batch_samples": ["self", "epoch_iterator", "num_batches", "device"],
}


def changed(method: str, what: str) -> str:
    return f"transformers.Trainer.{method} changed ({what}): update tuning/train/hf_private.py"


@pytest.mark.parametrize("method", sorted(EXPECTED_SIGNATURES))
def test_the_private_methods_we_override_keep_their_signature(method):
    assert hasattr(Trainer, method), changed(method, "it no longer exists")
    params = list(inspect.signature(getattr(Trainer, method)).parameters)
    assert params == EXPECTED_SIGNATURES[method], changed(method, f"parameters are now {params}")


def trainer_private_names() -> set[str]:
    """Every private method of ``Trainer`` and every private attribute it sets on itself."""
    source = Path(transformers.trainer.__file__).read_text(encoding="utf-8")
    methods = {n for n in dir(Trainer) if n.startswith("_") and not n.startswith("__")}
    return methods | set(re.findall(r"self\.(_[a-z][a-z0-9_]*)\s*=", source))


def test_no_other_module_touches_the_trainers_private_surface():
    """Overrides (``def _x``) and uses (``obj._x``) of the Trainer's private names live in hf_private.py
    only. (A private name of our own that happens to equal one of the Trainer's counts too: rename it.)"""
    private = trainer_private_names()
    package = Path(__file__).resolve().parent.parent / "tuning"
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "hf_private.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "name", None)
            if isinstance(node, (ast.Attribute, ast.FunctionDef)) and name in private:
                found.append(f"{path.relative_to(package.parent)}:{node.lineno} {name}")
    assert not found, f"transformers.Trainer private surface outside tuning/train/hf_private.py: {found}"


class Line(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((self.w(x).squeeze(-1) - labels) ** 2).mean()}


class Recording(hf_private.PrivateTrainerHooks, Trainer):
    """Our hooks around the private save, recording what happens, and every micro-batch's loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[tuple] = []
        self.step_losses: list[float] = []

    def before_checkpoint_write(self, folder):
        self.events.append(("before", folder.name, folder.exists(), self.args.save_total_limit))
        return True

    def after_checkpoint_write(self, folder):
        self.events.append(("after", folder.name, (folder / "trainer_state.json").is_file()))

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.step_losses.append(float(loss))
        return loss


class Probe(TrainerCallback):
    """At ``on_train_begin`` (optionally putting a window back) and ``on_save``, reads the window."""

    def __init__(self, trainer: Recording, restore: tuple[float, int] | None = None) -> None:
        self.trainer, self.restore = trainer, restore
        self.at_begin = None
        self.windows: dict[int, tuple[float, int]] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_begin = (hf_private.logging_window(self.trainer), state.global_step)
        if self.restore:
            hf_private.restore_logging_window(self.trainer, *self.restore)

    def on_save(self, args, state, control, **kwargs):  # after the step's log line, if it has one
        self.windows[state.global_step] = hf_private.logging_window(self.trainer)


def make_trainer(out, restore=None, max_steps=4, base=Recording) -> tuple[Recording, Probe]:
    torch.manual_seed(0)
    rows = [{"x": torch.randn(3), "labels": torch.randn(())} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=0.1,
        logging_strategy="steps",
        logging_steps=2,
        save_strategy="steps",
        save_steps=3,
        save_total_limit=1,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = base(model=Line(), args=args, train_dataset=rows)
    probe = Probe(trainer, restore)
    trainer.add_callback(probe)
    return trainer, probe


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.mark.slow  # two short trainings: about a second
def test_save_checkpoint_logging_window_and_rotation_behave_as_hf_private_assumes(tmp_path):
    trainer, probe = make_trainer(tmp_path)
    with hf_private.hf_rotation_disabled(trainer) as limit:
        trainer.train()
    assert limit == 1 and trainer.args.save_total_limit == 1

    # _save_checkpoint writes output_dir/checkpoint-<global_step>, between our two hooks; with the limit
    # hidden it rotates nothing (checkpoint-3 survives a limit of 1)
    assert trainer.events == [
        ("before", "checkpoint-3", False, None),
        ("after", "checkpoint-3", True),
        ("before", "checkpoint-4", False, None),
        ("after", "checkpoint-4", True),
    ], changed("_save_checkpoint", "where or when it writes")
    assert (tmp_path / "checkpoint-3").is_dir() and (tmp_path / "checkpoint-4").is_dir(), changed(
        "_save_checkpoint", "it rotates checkpoints without args.save_total_limit"
    )

    # train() resets _tr_loss and _globalstep_last_logged right before on_train_begin; the logged loss
    # is _tr_loss / (global_step - _globalstep_last_logged), and logging empties the window
    assert probe.at_begin == ((0.0, 0), 0), changed("_inner_training_loop", "the logging window's reset")
    l1, l2, l3, l4 = trainer.step_losses
    assert losses(trainer)[2] == pytest.approx((l1 + l2) / 2, rel=1e-6), changed(
        "_maybe_log_save_evaluate", "loss"
    )
    assert probe.windows[3] == (pytest.approx(l3, rel=1e-6), 2), changed("_tr_loss", "what it holds")
    assert probe.windows[4] == (0.0, 4), changed("_maybe_log_save_evaluate", "the window after a log")

    # a resumed run with the window put back at on_train_begin logs what the uninterrupted one did
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    resumed, resumed_probe = make_trainer(tmp_path / "resumed", restore=probe.windows[3])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed_probe.at_begin == ((0.0, 3), 3), changed("_inner_training_loop", "the window on resume")
    assert losses(resumed)[4] == losses(trainer)[4], changed("_tr_loss", "restoring it no longer continues")

    # save_checkpoint_now saves the current step as the Trainer does, on_save included
    saved = []
    resumed.add_callback(
        type("OnSave", (TrainerCallback,), {"on_save": lambda self, *a, **k: saved.append(1)})()
    )
    hf_private.save_checkpoint_now(resumed)
    assert (tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json").is_file() and saved == [1]


class PlainRecording(Trainer):
    """Hugging Face's own loop, recording micro-batches: what the _run_epoch override guards against."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_losses: list[float] = []

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.step_losses.append(float(loss))
        return loss


@pytest.mark.slow  # three short trainings
def test_resumed_at_max_steps_mid_epoch_nothing_is_trained(tmp_path):
    first, _ = make_trainer(tmp_path, max_steps=3)  # 4 steps per epoch: checkpoint-3 is mid-epoch
    first.train()
    checkpoint = str(tmp_path / "checkpoint-3")

    plain, _ = make_trainer(tmp_path / "plain", max_steps=3, base=PlainRecording)
    plain.train(resume_from_checkpoint=checkpoint)
    assert plain.state.global_step == 4, (
        "transformers no longer trains past max_steps when resumed at it mid-epoch: "
        "drop the _run_epoch override in tuning/train/hf_private.py"
    )

    ours, _ = make_trainer(tmp_path / "ours", max_steps=3)
    ours.train(resume_from_checkpoint=checkpoint)
    assert (ours.state.global_step, ours.step_losses) == (3, []), changed("_run_epoch", "when it is called")


def test_run_epoch_hands_training_step_the_objects_get_batch_samples_returned(tmp_path):
    """tuning/train/oom.py finds a failed micro-batch among the step's by identity."""
    seen, returned = [], []

    class Recording(Trainer):
        def get_batch_samples(self, *args):
            batches, num_items = super().get_batch_samples(*args)
            returned.append([id(b) for b in batches])
            return batches, num_items

        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append(id(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    model = torch.nn.Linear(1, 1)
    model.forward = lambda x, labels: {"loss": ((model.weight * x).sum() - labels.sum()) ** 2}
    data = [{"x": torch.tensor([float(i)]), "labels": torch.tensor([1.0])} for i in range(8)]
    args = TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    Recording(model=model, args=args, train_dataset=data).train()
    assert len(returned) == 2, changed("get_batch_samples", "not called once per optimizer step")
    assert seen == [i for step in returned for i in step], changed(
        "_run_epoch", "training_step no longer receives the objects get_batch_samples returned"
    )
