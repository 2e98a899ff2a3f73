"""Test fixtures: a tiny Llama and tokenizer built offline, and small data files.

Tiers: plain tests are unit tests (fast); ``@pytest.mark.slow`` ones run the real CLI end to end
(seconds each). CI runs both: ``pytest`` selects everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Two torch threads per process on two busy cores made a step 100x slower here: pin to one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# a job handed over in the environment (fms-hf-tuning's convention) would configure every parse in the suite
for _job_variable in ("SFT_TRAINER_CONFIG_JSON_PATH", "SFT_TRAINER_CONFIG_JSON_ENV_VAR"):
    os.environ.pop(_job_variable, None)
# the flag table (tuning/flag_table.py) the suite's parsers write: one per run, not in the user's ~/.cache
if "TUNING_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TUNING_CACHE_DIR"] = tempfile.mkdtemp(prefix="tuning-cache-")

import pytest  # noqa: E402 (the environment above must be set before torch is imported)
import torch  # noqa: E402

torch.set_num_threads(1)

from tuning.testing.tiny_model import build_tokenizer, write_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

TWEETS = [
    ("@HMRCcustomers No this is my first job", "no complaint"),
    ("@KristaMariePark Thank you for your interest!", "no complaint"),
    ("If I can't get my 3rd pair of headphones to work today I'm done.", "complaint"),
    ("@EE On Rosneath Arial having good upload and download speeds", "no complaint"),
    ("Couples wallpaper, so cute. :) #BrothersAtHome", "no complaint"),
    ("@mckelldogs This might just be me, but-- eyedrops?", "no complaint"),
    ("@Yelp can we get the exact calculations for a business rating?", "no complaint"),
    ("@nationalgridus I have no water and the bill is current and paid.", "complaint"),
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def io_rows(n_repeat: int = 4) -> list[dict]:
    return [{"input": i, "output": o} for i, o in TWEETS] * n_repeat


def text_rows(n_repeat: int = 4) -> list[dict]:
    return [{"output": f"### Text: {i}\n\n### Label: {o}"} for i, o in TWEETS] * n_repeat


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(args: list[str], *, as_file: bool = False, env: dict | None = None, timeout: int = 300):
    """Run the real entry point in a subprocess; returns CompletedProcess (text)."""
    entry = [str(REPO / "tuning" / "sft_trainer.py")] if as_file else ["-m", "tuning.sft_trainer"]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *entry, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


def run_keeping_model(monkeypatch: pytest.MonkeyPatch, argv: list[str]):
    """Run ``sft_trainer.main(argv)`` in-process; returns (exit code, the model it trained), the model
    captured where the adapter stage hands it on (the trained object itself, not a reload)."""
    from tuning import sft_trainer
    from tuning.model.peft import apply_peft

    kept = {}

    def spy(*args):
        kept["model"] = apply_peft(*args)
        return kept["model"]

    monkeypatch.setattr(sft_trainer, "apply_peft", spy)
    return sft_trainer.main(argv), kept.get("model")


def loss_and_grads(model, batch):
    """The loss of one forward on ``batch`` and every parameter's gradient, flattened into one tensor."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])
