"""Trackers: each records a tiny-model run (loss per log step, config, its ``<tracker>_tracker.json``);
a missing package exits 1 with the install command; a tracker failing mid-run costs a warning only.

One in-process run feeds every tracker that is installed (TensorBoard is in the dev extra; aim and
mlflow are big installs, so their tests skip when the package is absent and say so).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys

import pytest

from tests.conftest import io_rows, write_json
from tuning.config import parse_config
from tuning.errors import UserError
from tuning.sft_trainer import main, run
from tuning.trackers import NullTracker, RunInfo, TrackerCallback, build_trackers
from tuning.train import read_training_logs

INSTALLED = [t for t in ("tensorboard", "aim", "mlflow") if importlib.util.find_spec(t)]


def argv(model, train, out, *extra: str) -> list[str]:
    return [
        *("--model_name_or_path", str(model), "--training_data_path", str(train)),
        *("--output_dir", str(out), "--torch_dtype", "float32", "--use_flash_attn", "false"),
        *("--per_device_train_batch_size", "4", "--max_steps", "3", "--logging_steps", "1"),
        *("--save_strategy", "no", "--learning_rate", "1e-3", *extra),
    ]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("tracked")
    train = write_json(root / "train.json", io_rows(2))
    out = root / "out"
    extra = ["--tracker", *INSTALLED, "--experiment", "tiny", "--exp_metadata", '{"team": "nlp"}']
    summary = run(parse_config(argv(tiny_model_dir, train, out, *extra)))
    losses = [r["value"] for r in read_training_logs(out)]
    assert [r["step"] for r in read_training_logs(out)] == [1, 2, 3]
    return out, summary, losses


def link(out, name: str) -> dict:
    return json.loads((out / f"{name}_tracker.json").read_text())


def test_tracker_flags_prefix_and_file_logger_always_on():
    config = parse_config(["--model_name_or_path", "m", "--training_data_path", "d", "--output_dir", "o"])
    assert config.trackers.trackers == ["file_logger"]
    base = ["--model_name_or_path", "m", "--training_data_path", "d", "--output_dir", "o"]
    config = parse_config([*base, "--tracker", "aim", "mlflow", "--exp_metadata", '{"a": 1}'])
    assert config.trackers.trackers == ["file_logger", "aim", "mlflow"]
    assert config.trackers.exp_metadata == {"a": 1}
    with pytest.raises(UserError, match="invalid choice: 'neptune'"):
        parse_config([*base, "--trackers", "neptune"])
    with pytest.raises(UserError, match="--exp_metadata: not valid JSON"):
        parse_config([*base, "--exp_metadata", "{team: nlp}"])


@pytest.mark.parametrize(
    ("tracker", "package"), [("aim", "aim"), ("tensorboard", "tensorboard"), ("mlflow", "mlflow")]
)
def test_missing_package_is_user_error_with_install_hint(monkeypatch, tracker, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    base = ["--model_name_or_path", "m", "--training_data_path", "d", "--output_dir", "o"]
    with pytest.raises(UserError) as e:
        build_trackers(parse_config([*base, "--trackers", tracker]))
    assert str(e.value) == (
        f"--trackers {tracker}: the {package} package is not installed; "
        f"install it with: pip install 'tuning[{tracker}]'"
    )


def test_missing_package_exits_1_before_loading(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "aim", None)
    # the model path does not exist: reaching the model stage would be a different error
    code = main(
        ["--model_name_or_path", str(tmp_path / "none"), "--training_data_path", "d"]
        + ["--output_dir", str(tmp_path / "out"), "--trackers", "aim"]
    )
    assert code == 1
    assert "pip install 'tuning[aim]'" in capsys.readouterr().err


class Broken:
    """A tracker whose server went away after the run started."""

    name = "broken"

    def __init__(self) -> None:
        self.logged = 0

    def start(self, info: RunInfo) -> dict:
        return {"run_id": "r1"}

    def log(self, metrics: dict, step: int, epoch: float) -> None:
        self.logged += 1
        raise ConnectionError("server gone\nmore detail")

    def finish(self) -> None:
        raise AssertionError("a dropped tracker is not finished")


def test_failing_tracker_warns_once_and_is_dropped(tmp_path, caplog):
    from transformers import TrainerControl, TrainerState

    broken, null = Broken(), NullTracker("aim")
    callback = TrackerCallback([broken, null], RunInfo("e", "e-1", str(tmp_path)))
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(None, state, control)
    assert json.loads((tmp_path / "broken_tracker.json").read_text()) == {"tracker": "broken", "run_id": "r1"}
    assert not (tmp_path / "aim_tracker.json").exists()  # null: non-zero ranks record nothing
    with caplog.at_level(logging.WARNING, logger="tuning.trackers"):
        for step in (1, 2):
            state.global_step = step
            callback.on_log(None, state, control, logs={"loss": 1.5, "trained_tokens": 10})
        callback.on_train_end(None, state, control)
    assert broken.logged == 1
    assert callback.trackers == []  # finished and released: a second close() finishes nothing twice
    assert [r.getMessage() for r in caplog.records] == [
        "tracker broken failed to log (ConnectionError: server gone); training continues without it"
    ]


@pytest.mark.slow
def test_run_summary_lists_tracker_run_ids(tracked):
    out, summary, _ = tracked
    assert set(summary["trackers"]) == set(INSTALLED)
    for name in INSTALLED:
        assert link(out, name)["run_id"] == summary["trackers"][name]
    assert not (out / "file_logger_tracker.json").exists()


@pytest.mark.slow
def test_tensorboard_records_losses(tracked):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, losses = tracked
    info = link(out, "tensorboard")
    assert info["log_dir"].startswith(str((out / "tensorboard").resolve()))
    events = EventAccumulator(info["log_dir"])
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx(losses)
    assert [e.step for e in events.Scalars("train/trained_tokens")] == [1, 2, 3]
    assert {"train/learning_rate", "train/grad_norm", "train/trained_tokens_per_second"} <= set(
        events.Tags()["scalars"]
    )


@pytest.mark.slow
def test_aim_records_losses_and_params(tracked):
    pytest.importorskip(
        "aim", reason="aim is not installed (pip install 'tuning[aim]'); big install, not in dev"
    )
    from aim import Repo
    from aim.sdk.index_manager import RepoIndexManager

    out, _, losses = tracked
    info = link(out, "aim")
    assert info["repo"] == str(out.resolve())
    repo = Repo.from_path(info["repo"])
    RepoIndexManager.get_index_manager(repo).index(info["run_id"])  # what `aim up` does in the background
    aim_run = repo.get_run(info["run_id"])
    assert aim_run.experiment == "tiny"
    assert aim_run["hparams"]["exp_metadata.team"] == "nlp"
    assert aim_run["hparams"]["learning_rate"] == 1e-3
    metrics = {(m.name, m.context.to_dict()["subset"]): m for m in aim_run.metrics()}
    # aim keeps a sequence keyed by a hash of the step: compare the values as a set
    assert sorted(metrics["loss", "train"].values.values_list()) == pytest.approx(sorted(losses))
    assert ("grad_norm", "train") in metrics and ("trained_tokens", "train") in metrics


@pytest.mark.slow
def test_mlflow_records_losses_and_params_in_sqlite(tracked):
    pytest.importorskip(
        "mlflow", reason="mlflow is not installed (pip install 'tuning[mlflow]'); big install"
    )
    from mlflow import MlflowClient

    out, _, losses = tracked
    info = link(out, "mlflow")
    assert info["tracking_uri"] == f"sqlite:///{(out / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    history = client.get_metric_history(info["run_id"], "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(losses)
    mlflow_run = client.get_run(info["run_id"])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["exp_metadata.team"] == "nlp"
    assert mlflow_run.data.params["datasets"] == json.dumps([str(out.parent / "train.json")])
    assert client.get_experiment(info["experiment_id"]).name == "tiny"


class Counting(NullTracker):
    finished = 0

    def finish(self) -> None:
        Counting.finished += 1


def test_trackers_are_finished_when_training_fails(monkeypatch, tmp_path, tiny_model_dir, capsys):
    from tests.conftest import write_jsonl
    from tuning import sft_trainer
    from tuning.train.trainer import SFTTrainer

    real_build = build_trackers

    def build_with_counting(config):
        callback = real_build(config)
        callback.trackers.append(Counting("counting"))
        return callback

    def crash(self, *args, **kwargs):
        raise RuntimeError("boom mid-training")

    monkeypatch.setattr(sft_trainer, "build_trackers", build_with_counting)
    monkeypatch.setattr(SFTTrainer, "train", crash)
    Counting.finished = 0
    data = write_jsonl(tmp_path / "d.jsonl", io_rows(1))
    argv = ["--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(data),
            "--output_dir", str(tmp_path / "out"), "--torch_dtype", "float32", "--max_steps", "1"]  # fmt: skip
    assert sft_trainer.main(argv) == 203
    assert Counting.finished == 1
    assert (
        capsys.readouterr().err.strip().splitlines()[-1] == "internal error: RuntimeError: boom mid-training"
    )
