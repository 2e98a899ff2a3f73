"""DeepSpeed ZeRO-2/3 through the shipped accelerate configs, and the one-line error without the package.

DeepSpeed runs on CPU here (its CPU accelerator over gloo; the first launch JIT-builds its shared-memory
communication op with g++, ~40 s once per machine). The equivalence test is the FSDP one of
tests/test_distributed.py: global batch 8 on 2 processes against 1 process, losses within 1e-4, and the
final model (ZeRO-3: gathered from the shards) equal to the 1-process one. It needs the ``deepspeed``
extra (in ``dev``) and is skipped, saying so, where the package is missing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.test_distributed import (
    TINY_PARAMETERS,
    TOLERANCE,
    accelerate_launch,
    data,  # noqa: F401 (fixture)
    final_losses,
    training_args,
)
from tuning import launch, sft_trainer
from tuning.config import parse_config
from tuning.errors import UserError
from tuning.train import distributed
from tuning.train.distributed import DEEPSPEED_MISSING, launch_defaults

CONFIGS = {stage: REPO / "fixtures" / f"accelerate_deepspeed_zero{stage}.yaml" for stage in (2, 3)}
INSTALLED = importlib.util.find_spec("deepspeed") is not None


def test_shipped_configs_are_package_data_linked_from_fixtures():
    for stage, path in CONFIGS.items():
        assert path.is_symlink() and path.resolve() == launch.FIXTURES / path.name
        config = yaml.safe_load(path.read_text())
        assert config["distributed_type"] == "DEEPSPEED" and config["mixed_precision"] == "no"
        assert config["deepspeed_config"]["zero_stage"] == stage
    # batch, accumulation, clipping come from the training flags: the files must not pin them
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(
        yaml.safe_load(CONFIGS[3].read_text())["deepspeed_config"]
    )
    assert launch.shipped_config("accelerate_deepspeed_zero3.yaml") == str(launch.FIXTURES / CONFIGS[3].name)


@pytest.fixture
def without_deepspeed(monkeypatch):
    """The package as every check sees it when it is not installed (a no-op where it is not)."""
    if INSTALLED:
        version, find_spec = importlib.metadata.version, importlib.util.find_spec

        def hidden_version(name):
            if name == "deepspeed":
                raise importlib.metadata.PackageNotFoundError(name)
            return version(name)

        monkeypatch.setattr(importlib.metadata, "version", hidden_version)
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else find_spec(n, *a)
        )


def test_missing_deepspeed_is_one_line_and_exit_1(tmp_path, without_deepspeed, monkeypatch, capsys):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    argv = ["--model_name_or_path", "m", "--training_data_path", "d.json", "--output_dir", str(tmp_path)]
    # --deepspeed CONFIG: TrainingArguments imports it while the flags are parsed
    with pytest.raises(
        UserError,
        match=r"--deepspeed needs DeepSpeed, which is not installed; pip install 'tuning\[deepspeed\]'",
    ):
        parse_config([*argv, "--deepspeed", str(ds_json)])
    monkeypatch.setenv("TERMINATION_LOG_FILE", str(tmp_path / "termination.log"))
    assert sft_trainer.main([*argv, "--deepspeed", str(ds_json)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().endswith("(or pip install deepspeed)")
    # a rank started by an accelerate DeepSpeed launch (accelerate exports ACCELERATE_USE_DEEPSPEED)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="DeepSpeed is not installed"):
        launch_defaults()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    # tuning launch, before accelerate (which would print a traceback): the config file or the flag
    for job in ({"config_file": str(CONFIGS[3])}, {"use_deepspeed": True}):
        with pytest.raises(UserError, match="DeepSpeed is not installed"):
            launch.check_engine(job, {})
    with pytest.raises(UserError, match="DeepSpeed is not installed"):
        launch.check_engine({}, {"deepspeed": str(ds_json)})
    launch.check_engine({"config_file": str(REPO / "fixtures" / "accelerate_fsdp_defaults.yaml")}, {})
    assert (tmp_path / "termination.log").read_text().startswith("error: --deepspeed needs DeepSpeed")
    assert DEEPSPEED_MISSING.startswith("DeepSpeed is not installed; pip install 'tuning[deepspeed]'")


def test_cpu_deepspeed_launch_names_gloo(monkeypatch):
    monkeypatch.setattr(distributed, "deepspeed_installed", lambda: True)
    monkeypatch.setattr(distributed.torch.accelerator, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_defaults() == {"ddp_backend": "gloo"}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_defaults() == {}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_defaults() == {}


@pytest.mark.slow
@pytest.mark.skipif(not INSTALLED, reason="DeepSpeed is not installed (pip install 'tuning[deepspeed]')")
def test_zero2_and_zero3_on_two_processes_match_one(tmp_path, tiny_model_dir, data):  # noqa: F811
    one = tmp_path / "one"
    assert sft_trainer.main(training_args(tiny_model_dir, data, one, 4)) == 0
    reference = load_file(one / "final" / "model.safetensors")
    for stage, held in ((2, TINY_PARAMETERS), (3, TINY_PARAMETERS // 2)):
        out = tmp_path / f"zero{stage}"
        cmd = ["--config_file", str(CONFIGS[stage])]
        result = accelerate_launch(
            ["-m", "tuning.sft_trainer"], training_args(tiny_model_dir, data, out, 2), *cmd
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "loss: label_only (auto: llama is verified)" in result.stderr  # on sharded weights too
        # ZeRO-2 keeps full weights on every rank (it shards gradients and optimizer state); ZeRO-3 halves them
        assert f"DEEPSPEED: parameters held per rank {held}, {held}" in result.stderr
        assert f"{TINY_PARAMETERS}/{TINY_PARAMETERS} parameters trainable" in result.stderr
        assert final_losses(out) == pytest.approx(final_losses(one), abs=TOLERANCE)
        saved = load_file(out / "final" / "model.safetensors")
        assert saved.keys() == reference.keys()
        assert max((saved[k] - reference[k]).abs().max().item() for k in reference) < 1e-4
        shards = sorted(p.name for p in (out / "checkpoint-4" / "global_step4").iterdir())
        assert [n for n in shards if "optim_states" in n] == [
            f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
        ]
    # ZeRO-3 checkpoints are the per-rank shards alone (the shipped file gathers only the final model)
    assert not (tmp_path / "zero3" / "checkpoint-4" / "model.safetensors").exists()
    # the label-only loss (the head fetched by ZeRO-3's own module hooks) equals the model's own loss
    # under the same engine, step by step and in the final weights
    standard = tmp_path / "zero3-standard"
    args = [*training_args(tiny_model_dir, data, standard, 2), "--loss_implementation", "standard"]
    result = accelerate_launch(["-m", "tuning.sft_trainer"], args, "--config_file", str(CONFIGS[3]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert final_losses(standard) == pytest.approx(final_losses(tmp_path / "zero3"), abs=1e-6)
    saved, label_only = (
        load_file(standard / "final" / "model.safetensors"),
        load_file(tmp_path / "zero3" / "final" / "model.safetensors"),
    )
    assert max((saved[k] - label_only[k]).abs().max().item() for k in saved) < 1e-6
