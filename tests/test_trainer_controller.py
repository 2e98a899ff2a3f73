"""fms-hf-tuning's trainer controller (``--trainer_controller_config_file``): its own example rule files
(tests/fms_controller/, copied unchanged from its examples/trainercontroller_configs) change the run as it
documents; a rule that can't work is refused at start in one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import io_rows, write_json
from tuning.sft_trainer import main
from tuning.train.controller import Patience

pytest.importorskip(
    "simpleeval", reason="the trainer controller needs simpleeval: pip install 'tuning[controller]'"
)

RULES = Path(__file__).parent / "fms_controller"


def train(tmp_path: Path, model: Path, rules: Path, *extra: str) -> tuple[int, Path]:
    data = write_json(tmp_path / "train.json", io_rows(1))  # 8 rows
    out = tmp_path / "out"
    argv = [
        *("--model_name_or_path", str(model), "--training_data_path", str(data), "--output_dir", str(out)),
        *("--torch_dtype", "float32", "--per_device_train_batch_size", "8", "--logging_steps", "1"),
        *("--trainer_controller_config_file", str(rules), *extra),
    ]
    return main(argv), out


def steps(out: Path) -> int:
    return json.loads((out / "run_summary.json").read_text())["steps"]


@pytest.mark.slow
def test_stop_on_loss_threshold(tmp_path, tiny_model_dir):
    # thresholded-training-loss.yaml: stop when the last logged loss > 2.2; the tiny model's is ~5.9
    code, out = train(
        tmp_path, tiny_model_dir, RULES / "thresholded-training-loss.yaml", "--num_train_epochs", "5"
    )
    assert code == 0
    assert steps(out) == 1


@pytest.mark.slow
def test_loss_rule_that_never_holds_changes_nothing(tmp_path, tiny_model_dir):
    # loss.yaml: stop when loss < 1.0, which a 3-step run of the tiny model never reaches
    code, out = train(tmp_path, tiny_model_dir, RULES / "loss.yaml", "--num_train_epochs", "3")
    assert code == 0
    assert steps(out) == 3


@pytest.mark.slow
def test_stop_on_patience(tmp_path, tiny_model_dir):
    # epoch-level-eval-loss-patience.yaml: on_epoch_end, eval_loss > 2 with patience_threshold 2. Epoch 1
    # ends before its evaluation (empty window: rule false); the rule then holds at the ends of epochs 2, 3
    # (tolerated: counter 1, 2) and 4 (counter 3 > 2): training stops after epoch 4 of 6, one step each.
    code, out = train(
        tmp_path,
        tiny_model_dir,
        RULES / "epoch-level-eval-loss-patience.yaml",
        *("--num_train_epochs", "6", "--eval_strategy", "epoch", "--validation_data_path"),
        str(tmp_path / "train.json"),
    )
    assert code == 0
    assert steps(out) == 4


@pytest.mark.slow
def test_save_on_epoch_end(tmp_path, tiny_model_dir):
    rules = tmp_path / "save.yaml"
    rules.write_text(
        "controller_metrics:\n  - name: trainer_state\n    class: TrainingState\n"
        "controllers:\n  - name: save_each_epoch\n    triggers: [on_epoch_end]\n"
        '    rule: trainer_state["epoch"] >= 1\n    operations: [hfcontrols.should_save]\n',
        encoding="utf-8",
    )
    code, out = train(tmp_path, tiny_model_dir, rules, "--num_train_epochs", "2", "--save_strategy", "no")
    assert code == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.slow
def test_log_controller_formats_fms_example(tmp_path, tiny_model_dir, caplog):
    with caplog.at_level("INFO", logger="tuning.train.controller"):
        code, _ = train(
            tmp_path, tiny_model_dir, RULES / "logging_controller_with_rank.yaml", "--num_train_epochs", "1"
        )
    assert code == 0
    assert "Epoch: 1, Step: 1, Rank: 0, loss = {'loss':" in caplog.text
    assert f"Saving final checkpoint in {tmp_path / 'out'}/checkpoint-1" in caplog.text


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ('trainig_loss["loss"] < 1.0', "controller my_rule: rule names 'trainig_loss', which is no metric"),
        ('training_loss["loss"] <', "controller my_rule: rule 'training_loss[\"loss\"] <' is not valid"),
        ("training_loss.__class__", "controller my_rule: a rule may not use '__'"),
    ],
)
def test_bad_rule_exits_1_at_start_naming_it(tmp_path, tiny_model_dir, capsys, rule, message):
    rules = tmp_path / "bad.yaml"
    rules.write_text(
        "controller_metrics:\n  - name: training_loss\n    class: Loss\n"
        f"controllers:\n  - name: my_rule\n    triggers: [on_log]\n    rule: '{rule}'\n"
        "    operations: [hfcontrols.should_training_stop]\n",
        encoding="utf-8",
    )
    code, out = train(tmp_path, tiny_model_dir, rules)
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (out / "run_summary.json").exists()


def test_patience_counts_like_fms():
    # reset_on_failure: acts on the (threshold + 1)-th consecutive hold, then starts over
    patience = Patience(patience_threshold=2)
    assert [patience.tolerate(h) for h in (True, True, True, True, False, True)] == [
        True,
        True,
        False,
        True,
        True,
        True,
    ]
    keep = Patience(patience_threshold=1, mode="no_reset_on_failure")
    assert [keep.tolerate(h) for h in (True, False, True)] == [True, True, False]
