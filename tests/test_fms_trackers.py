"""The trackers fms-hf-tuning users bring (clearml, hf_resource_scanner) and those users of other tools
expect (wandb, trackio), several at once, in offline mode: each writes what it should. A tracker whose
package is absent is skipped here (naming the install), and exits 1 with the install line in a run."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import io_rows, run_cli, write_json
from tuning.config import parse_config
from tuning.errors import UserError
from tuning.trackers import tracker_class
from tuning.train import read_training_logs

OFFLINE = {"wandb": "wandb", "clearml": "clearml", "hf_resource_scanner": "HFResourceScanner"}
INSTALLED = [name for name, package in OFFLINE.items() if importlib.util.find_spec(package)]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model_dir):
    if not INSTALLED:
        pytest.skip(
            "none of wandb, clearml, HFResourceScanner installed: pip install 'tuning[wandb,clearml]'"
        )
    root = tmp_path_factory.mktemp("fms-trackers")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "CLEARML_OFFLINE_MODE": "1",
        "CLEARML_CACHE_DIR": str(root / "clearml-cache"),
        "HOME": str(root / "home"),  # clearml's offline sessions and config live under ~/.clearml
    }
    train = write_json(root / "train.json", io_rows(3))  # 24 rows: 6 steps of 4 (the scanner reads step 5)
    out = root / "out"
    argv = [
        *(
            "--model_name_or_path",
            str(tiny_model_dir),
            "--training_data_path",
            str(train),
            "--output_dir",
            str(out),
        ),
        *("--torch_dtype", "float32", "--per_device_train_batch_size", "4", "--max_steps", "6"),
        *("--logging_steps", "2", "--save_strategy", "no", "--tracker", ",".join(INSTALLED)),
        *("--run_uri_export_path", str(root / "links"), "--clearml_task", "tiny-task"),
    ]
    # The real CLI in its own process, as users run it: these packages patch process-wide state
    # (HFResourceScanner wraps Trainer._save_checkpoint, clearml hooks frameworks), and clearml run
    # under pytest analyses pytest's own folder as "the script's repository" for up to 5 minutes.
    done = run_cli(argv, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = read_training_logs(out)
    return root, out, [(r["step"], r["value"]) for r in logs]


def link(out, name: str) -> dict:
    return json.loads((out / f"{name}_tracker.json").read_text())


@pytest.mark.slow
def test_several_trackers_at_once_each_linked_and_exported(tracked):
    root, out, losses = tracked
    assert [step for step, _ in losses] == [2, 4, 6]
    for name in INSTALLED:
        assert link(out, name)["tracker"] == name
        assert json.loads((root / "links" / f"{name}_tracker.json").read_text()) == link(out, name)


@pytest.mark.slow
@pytest.mark.skipif("wandb" not in INSTALLED, reason="wandb not installed: pip install 'tuning[wandb]'")
def test_wandb_offline_run_holds_every_logged_loss(tracked):
    _, out, losses = tracked
    info = link(out, "wandb")
    assert info["mode"] == "offline"
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{info['run_id']}/run-{info['run_id']}.wandb")
    records = run_file.read_bytes()
    # history records keep each value's JSON text next to its key
    for _, loss in losses:
        assert b"\x12\x04loss\x82\x01" + bytes([len(repr(loss))]) + repr(loss).encode() in records


@pytest.mark.slow
@pytest.mark.skipif("clearml" not in INSTALLED, reason="clearml not installed: pip install 'tuning[clearml]'")
def test_clearml_offline_session_holds_every_logged_loss(tracked):
    _, out, losses = tracked
    info = link(out, "clearml")
    assert info["offline"] is True
    folder = Path(info["offline_folder"])
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    events = [e for batch in events for e in (batch if isinstance(batch, list) else [batch])]
    got = [(e["iter"], e["value"]) for e in events if e["metric"] == "train" and e["variant"] == "loss"]
    assert got == losses
    task = json.loads((folder / "task.json").read_text())
    assert task["name"] == "tiny-task"


@pytest.mark.slow
@pytest.mark.skipif(
    "hf_resource_scanner" not in INSTALLED,
    reason="HFResourceScanner not installed: pip install 'tuning[hf_resource_scanner]'",
)
def test_resource_scanner_writes_its_report(tracked):
    _, out, _ = tracked
    report = json.loads((out / "scanner_output.json").read_text())
    assert report["time_data"]["fwd_begin_relative"] > 0
    assert report["tps_data"]["tokens"] > 0


@pytest.mark.skipif(
    "hf_resource_scanner" not in INSTALLED,
    reason="HFResourceScanner not installed: pip install 'tuning[hf_resource_scanner]'",
)
def test_resource_scanner_leaves_trainer_and_collectives_as_it_found_them(tmp_path):
    import torch.distributed as dist
    from transformers import Trainer, TrainerControl, TrainerState

    from tuning.config import TrackerArgs
    from tuning.trackers.resource_scanner_tracker import ResourceScannerTracker

    before = {"trainer": dict(vars(Trainer)), "all_reduce": dist.all_reduce}
    tracker = ResourceScannerTracker(TrackerArgs(), str(tmp_path))
    # step 0 of a run shorter than the scanner's target step, saving nothing: the scanner patches
    # the Trainer class and the collectives here and never puts them back itself
    tracker.callback.on_step_begin(None, TrainerState(), TrainerControl())
    assert dict(vars(Trainer)) != before["trainer"] and dist.all_reduce is not before["all_reduce"]
    tracker.finish()
    assert dict(vars(Trainer)) == before["trainer"]
    assert dist.all_reduce is before["all_reduce"]


@pytest.mark.parametrize(
    ("tracker", "package"),
    [
        ("wandb", "wandb"),
        ("clearml", "clearml"),
        ("trackio", "trackio"),
        ("hf_resource_scanner", "HFResourceScanner"),
    ],
)
def test_missing_package_names_the_install_line(monkeypatch, tracker, package):
    real = importlib.import_module

    def no_package(name, *args):
        if name == package:
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_package)
    with pytest.raises(UserError, match=rf"pip install 'tuning\[{tracker}\]'"):
        tracker_class(tracker)


def test_tracker_values_comma_separated_or_repeated(tmp_path):
    base = ["--model_name_or_path", "m", "--training_data_path", "d", "--output_dir", str(tmp_path)]
    one = parse_config([*base, "--tracker", "aim,mlflow"]).trackers.trackers
    two = parse_config([*base, "--tracker", "aim", "mlflow"]).trackers.trackers
    assert one == two == ["file_logger", "aim", "mlflow"]


@pytest.mark.skipif(
    importlib.util.find_spec("trackio") is None,
    reason="trackio not installed (it upgrades pillow; not in the dev extra): pip install 'tuning[trackio]'",
)
def test_trackio_records_each_logged_step(tmp_path, monkeypatch):
    import sqlite3

    import trackio.sqlite_storage
    import trackio.utils

    from tuning.config import TrackerArgs
    from tuning.trackers import RunInfo
    from tuning.trackers.trackio_tracker import TrackioTracker

    # trackio reads $TRACKIO_DIR once, at import: point its modules at this test's folder
    for module in (trackio.utils, trackio.sqlite_storage):
        monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    tracker = TrackioTracker(TrackerArgs(experiment="tiny"), str(tmp_path / "out"))
    info = RunInfo(
        experiment="tiny", run_name="tiny-1", output_dir=str(tmp_path / "out"), params={"lr": 1e-3}
    )
    assert tracker.start(info) == {"run_id": "tiny-1", "project": "tiny"}
    tracker.log({"loss": 5.5, "grad_norm": 2.0}, step=1, epoch=0.25)
    tracker.log({"loss": 5.25}, step=2, epoch=0.5)
    tracker.finish()
    with sqlite3.connect(trackio.sqlite_storage.SQLiteStorage.get_project_db_path("tiny")) as db:
        rows = db.execute("select run_name, step, metrics from metrics order by step").fetchall()
    assert [(name, step, json.loads(metrics)) for name, step, metrics in rows] == [
        ("tiny-1", 1, {"loss": 5.5, "grad_norm": 2.0, "epoch": 0.25}),
        ("tiny-1", 2, {"loss": 5.25, "epoch": 0.5}),
    ]
