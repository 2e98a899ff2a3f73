"""Online data mixing (``dataprocessor: type: odm``): the EXP3 update against hand-computed numbers, the
sampler's draws and exact state, the config's refusals, and (slow) the CLI end to end: the harder
dataset's ratio rises, the ratios are logged, and a run killed mid-step resumes to the same draws."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_json
from tests.test_resume import fork_with_fault
from tuning.config import parse_config
from tuning.data.data_config import load_data_config
from tuning.data.odm import MixingPlan, OdmConfig, OnlineMixingSampler, sampling_ratio, updated_weights
from tuning.errors import UserError
from tuning.sft_trainer import main, run
from tuning.train.online_mixing import entropy_reward

# --- the bandit's arithmetic, worked out by hand ----------------------------------------------------


def test_sampling_ratio_mixes_weights_with_uniform_exploration():
    # (1 - gamma) * w / sum(w) + gamma / K
    assert sampling_ratio([1.0, 1.0], 0.1) == pytest.approx([0.5, 0.5])
    assert sampling_ratio([2.0, 1.0], 0.2) == pytest.approx([0.8 * 2 / 3 + 0.1, 0.8 / 3 + 0.1])
    assert sampling_ratio([5.0, 0.0, 1.0], 1.0) == pytest.approx([1 / 3, 1 / 3, 1 / 3])  # all exploration


def test_exp3_update_matches_hand_computed_weights_and_ratios():
    # fms defaults gamma 0.1, eta 0.3, two arms at weight 1 (ratio 0.5 each), rewards 2.0 and 1.0 once each:
    # w0 = exp(0.3 * 2.0 / 0.5 / 2) = e^0.6, w1 = e^0.3
    weights = updated_weights([1.0, 1.0], [0.5, 0.5], [2.0, 1.0], [1, 1], 0.3)
    assert weights == pytest.approx([1.8221188003905089, 1.3498588075760032])
    # ratio0 = 0.9 * e^0.6 / (e^0.6 + e^0.3) + 0.05 = 0.9 / (1 + e^-0.3) + 0.05
    assert sampling_ratio(weights, 0.1) == pytest.approx([0.5669982651304932, 0.43300173486950677])
    # rewards are means over their counts: 3.0 over 3 rows is 1.0, 0.9 over 3 is 0.3; weights [2, 1],
    # gamma 0.2 (ratios 19/30, 11/30), eta 0.5: w0 = 2 e^(0.5 * 1.0 / (19/30) / 2), w1 = e^(0.5 * 0.3 / (11/30) / 2)
    weights = updated_weights([2.0, 1.0], [19 / 30, 11 / 30], [3.0, 0.9], [3, 3], 0.5)
    assert weights == pytest.approx([2.9679872297921737, 1.226967225815787])
    assert sampling_ratio(weights, 0.2) == pytest.approx([0.6660108611333246, 0.33398913886667536])


def test_sampler_update_and_buffered_rewards_follow_fms():
    sampler = OnlineMixingSampler(plan([4, 4]))
    assert sampler.ratio == pytest.approx([0.5, 0.5])
    sampler.arm = 1  # train_loss: the logged loss is the reward of the arm drawn last
    rewards, counts = sampler.buffered_reward(2.5)
    assert (rewards, counts) == ([1e-100, 2.5], [1, 1])
    sampler.update(rewards, counts)
    # w1 = exp(0.3 * 2.5 / 0.5 / 2) = e^0.75; w0 = exp(0.3 * 1e-100 / 0.5 / 2) = 1
    assert sampler.weights == pytest.approx([1.0, 2.117000016612675])
    sampler.arm = 0
    assert sampler.buffered_reward(1.0) == ([1.0, 2.5], [1, 1])  # arm 1 keeps its last value


def test_entropy_reward_of_known_distributions():
    vocab = 4
    uniform = torch.zeros(1, 3, vocab)  # entropy log 4 at every position: normalised 1
    certain = torch.full((1, 3, vocab), -1e4)
    certain[..., 0] = 0  # entropy 0
    trained = torch.tensor([[True, True]])
    assert entropy_reward(uniform, trained, "entropy") == pytest.approx(1.0)
    assert entropy_reward(certain, trained, "entropy") == pytest.approx(0.0, abs=1e-6)
    # position 0 uniform (1.0), position 1 certain (0.0): only trained positions count
    mixed = torch.cat([uniform[:, :1], certain[:, 1:]], dim=1)
    assert entropy_reward(mixed, torch.tensor([[True, True]]), "entropy") == pytest.approx(0.5)
    assert entropy_reward(mixed, torch.tensor([[True, False]]), "entropy") == pytest.approx(1.0)
    assert entropy_reward(mixed, trained, "entropy_last_token") == pytest.approx(0.0, abs=1e-6)
    # rows are summed, each averaged over its own trained positions: 0.5 + 1.0
    both = torch.cat([mixed, mixed])
    assert entropy_reward(both, torch.tensor([[True, True], [True, False]]), "entropy") == pytest.approx(1.5)
    # two equally likely tokens: entropy ln 2 (normalised 0.5), varentropy 0 -> 0.75 * 0.5
    two = torch.full((1, 2, vocab), -1e4)
    two[..., :2] = 0
    assert entropy_reward(two, torch.tensor([[True]]), "entropy3_varent1") == pytest.approx(0.375)


# --- the sampler: draws and exact state -----------------------------------------------------------


def plan(lengths: list[int], **odm) -> MixingPlan:
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    names = [f"d{i}" for i in range(len(lengths))]
    return MixingPlan(OdmConfig(**odm), names, offsets, lengths, [1.0] * len(lengths), seed=7)


def test_draws_are_arm_blocks_of_sampling_interval_and_each_dataset_is_gone_through_in_full():
    sampler = OnlineMixingSampler(plan([5, 7], sampling_interval=3))
    drawn = list(sampler)
    assert len(drawn) == 12 == len(sampler)
    arms = [0 if i < 5 else 1 for i in drawn]
    assert all(len(set(arms[i : i + 3])) == 1 for i in range(0, 12, 3))  # a new arm every 3 samples
    assert sampler.counts == [arms.count(0), arms.count(1)]
    # each dataset is read in a shuffled order without repeats until it is gone through
    first = [i for i in drawn if i < 5][:5]
    assert len(set(first)) == len(first)


def test_a_restored_sampler_replays_the_pass_then_draws_what_the_original_draws():
    original = OnlineMixingSampler(plan([6, 10]))
    it = iter(original)
    head = [next(it) for _ in range(5)]
    original.update([3.0, 1.0], [1, 1])  # weights move mid-pass, as at a step's end
    state = json.loads(json.dumps(original.state_dict()))  # it travels as JSON in the marker
    tail = list(it)
    after = list(original)  # the next pass too

    resumed = OnlineMixingSampler(plan([6, 10]))
    resumed.load_state_dict(state)
    assert list(resumed) == head + tail  # the Trainer skips the first part of this pass
    assert list(resumed) == after
    assert resumed.counts == original.counts and resumed.weights == original.weights

    # the loader fetched to the pass's end before the save, and the Trainer has not finished the epoch
    whole = OnlineMixingSampler(plan([3, 3]))
    drawn = list(whole)
    state = whole.state_dict()
    replayed = OnlineMixingSampler(plan([3, 3]))
    replayed.load_state_dict(state)
    assert list(replayed) == drawn
    at_epoch_end = OnlineMixingSampler(plan([3, 3]))
    at_epoch_end.load_state_dict(state, mid_pass=False)
    assert list(at_epoch_end) == list(whole)  # the next pass


def test_a_state_from_other_datasets_is_refused():
    state = OnlineMixingSampler(plan([3, 3])).state_dict()
    with pytest.raises(UserError, match="same data config"):
        OnlineMixingSampler(plan([3, 3, 3])).load_state_dict(state)


# --- the config: fms's keys and defaults, bad values refused in one line --------------------------

ODM_CONFIG = """dataprocessor:
  type: odm
{odm}datasets:
  - name: a
    data_paths: [{path}]
    split: {{train: 0.8, validation: 0.2}}
  - name: b
    data_paths: [{path}]
{split_b}"""


def odm_config(
    tmp_path: Path, odm: str = "", split_b: str = "    split: {train: 0.8, validation: 0.2}\n"
) -> Path:
    data = write_json(tmp_path / "rows.json", [{"input": "a", "output": "b"}] * 4)
    path = tmp_path / "data.yaml"
    path.write_text(ODM_CONFIG.format(odm=odm, path=data, split_b=split_b), encoding="utf-8")
    return path


def test_fms_keys_and_defaults(tmp_path):
    config = load_data_config(str(odm_config(tmp_path)))
    assert config.odm == OdmConfig()
    assert (config.odm.sampling_interval, config.odm.reward_type, config.odm.gamma, config.odm.eta) == (
        1,
        "entropy",
        0.1,
        0.3,
    )
    assert config.odm.update_interval is None
    body = "  odm:\n    update_interval: 5\n    sampling_interval: 2\n    reward_type: TRAIN_LOSS\n    gamma: 0\n    eta: 1\n"
    config = load_data_config(str(odm_config(tmp_path, body)))
    assert (config.odm.update_interval, config.odm.sampling_interval, config.odm.reward_type) == (
        5,
        2,
        "train_loss",
    )


@pytest.mark.parametrize(
    ("odm", "split_b", "message"),
    [
        (
            "  odm:\n    update_intervall: 5\n",
            None,
            r"unknown key 'update_intervall' \(did you mean 'update_interval'\?\)",
        ),
        ("  odm:\n    reward_type: loss\n", None, "reward_type 'loss' is unknown; use one of entropy"),
        ("  odm:\n    gamma: 1.5\n", None, r"gamma 1.5 is out of range; use a number in \[0, 1\]"),
        ("  odm:\n    eta: 0\n", None, "eta 0 must be a positive number"),
        ("  odm:\n    sampling_interval: 0\n", None, "sampling_interval 0 must be a whole number"),
        ("  odm:\n    update_interval: 2.5\n", None, "'update_interval' must be int"),
        (
            "  odm:\n    auto_categorize_input_column: text\n",
            None,
            "auto_categorize_input_column is not supported",
        ),
        ("", "", "dataset 'b' has none; give it split"),  # the default reward (entropy) needs validation rows
        ("  streaming: true\n", None, "split needs row counts|streaming"),
    ],
    ids=[
        "typo",
        "reward",
        "gamma",
        "eta",
        "sampling-interval",
        "float-interval",
        "auto-categorize",
        "no-validation",
        "streaming",
    ],
)
def test_bad_values_are_one_line_user_errors(tmp_path, odm, split_b, message):
    kwargs = {} if split_b is None else {"split_b": split_b}
    with pytest.raises(UserError, match=message) as error:
        load_data_config(str(odm_config(tmp_path, odm, **kwargs)))
    assert "\n" not in str(error.value)


def test_type_odm_with_one_dataset_and_odm_under_type_default_are_refused(tmp_path):
    one = tmp_path / "one.yaml"
    one.write_text(
        f"dataprocessor:\n  type: odm\n  odm:\n    reward_type: train_loss\ndatasets:\n"
        f"  - name: a\n    data_paths: [{write_json(tmp_path / 'r.json', [{'input': 'a', 'output': 'b'}])}]\n"
    )
    with pytest.raises(UserError, match="at least two datasets"):
        load_data_config(str(one))
    text = odm_config(tmp_path, "  odm:\n    gamma: 0.2\n").read_text().replace("type: odm", "type: default")
    (tmp_path / "default.yaml").write_text(text)
    with pytest.raises(UserError, match="sets 'odm' but its type is default; set type: odm"):
        load_data_config(str(tmp_path / "default.yaml"))


# --- end to end (the CLI), resume --------------------------------------------------------------------

HARD_CONFIG = """dataprocessor:
  type: odm
  odm:
    update_interval: 2
    reward_type: {reward}
datasets:
  - name: easy
    data_paths: [{easy}]
    split: {{train: 0.9, validation: 0.1}}
  - name: hard
    data_paths: [{hard}]
    split: {{train: 0.9, validation: 0.1}}
"""


@pytest.fixture(scope="module")
def mixing_job(tmp_path_factory, tiny_model_dir):
    """One easy dataset (the same sentence) and one much harder (random letters), 40 rows each."""
    root = tmp_path_factory.mktemp("odm")
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    easy = write_json(
        root / "easy.json", [{"input": "Repeat.", "output": "the cat sat on the mat " * 3}] * 40
    )
    hard = write_json(
        root / "hard.json",
        [
            {
                "input": "Repeat.",
                "output": " ".join("".join(rng.choice(letters) for _ in range(5)) for _ in range(4)),
            }
            for _ in range(40)
        ],
    )

    def argv(out: Path, reward: str = "validation_loss", *extra: str) -> list[str]:
        config = root / f"{reward}.yaml"
        config.write_text(HARD_CONFIG.format(reward=reward, easy=easy, hard=hard), encoding="utf-8")
        return [
            *("--model_name_or_path", str(tiny_model_dir), "--data_config_path", str(config)),
            *("--output_dir", str(out), "--torch_dtype", "float32", "--use_flash_attn", "false"),
            *("--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1"),
            *extra,
        ]

    return root, argv


def mixing_records(out: Path) -> dict[str, dict[int, float]]:
    records: dict[str, dict[int, float]] = {}
    for line in (out / "training_logs.jsonl").read_text().splitlines():
        r = json.loads(line)
        records.setdefault(r["name"], {})[r["data"]["step"]] = r["data"]["value"]
    return records


@pytest.mark.slow
def test_the_harder_datasets_ratio_rises_and_is_logged(mixing_job, capfd):
    root, argv = mixing_job
    out = root / "rises"
    assert main(argv(out, "validation_loss", "--max_steps", "16")) == 0  # the CLI's entry point
    stderr = capfd.readouterr().err
    records = mixing_records(out)
    hard, easy = records["odm_ratio/hard"], records["odm_ratio/easy"]
    assert hard[1] == pytest.approx(0.5) and easy[1] == pytest.approx(0.5)  # equal start (no sampling ratios)
    for step in hard:
        assert hard[step] + easy[step] == pytest.approx(1.0)
    # a higher validation loss is a higher reward: the harder dataset is drawn more
    assert hard[16] > 0.55, hard
    assert records["odm_reward/hard"][16] > records["odm_reward/easy"][16]
    # drawn so far: 16 steps of 4, and the batch the loader fetched ahead
    assert records["odm_drawn/hard"][16] + records["odm_drawn/easy"][16] == 17 * 4
    assert "online data mixing, step 16: rewards easy" in stderr


@pytest.mark.slow
def test_a_run_killed_mid_step_resumes_to_the_uninterrupted_draws_and_weights(mixing_job):
    """72 training rows in batches of 12: 6 steps a pass. Killed in step 5 (resumes from checkpoint-3,
    mid-pass: the saved draws are replayed), then in step 8 (resumes from checkpoint-6, a pass's end)."""
    root, argv = mixing_job
    extra = ("--per_device_train_batch_size", "12", "--max_steps", "10", "--save_strategy", "steps")
    extra += ("--save_steps", "3", "--save_model_dir")
    reference, out = root / "reference", root / "killed"
    run(parse_config(argv(reference, "train_loss", *extra, str(reference / "final"))))
    for step, checkpoint in ((5, "checkpoint-3"), (8, "checkpoint-6")):
        log = root / f"killed-{step}.log"
        code, output = fork_with_fault(
            "kill-in-step", step, argv(out, "train_loss", *extra, str(out / "final")), log
        )
        assert code < 0, output
        assert "resuming from" in output or step == 5, output
        assert not (out / "final").exists() and (out / checkpoint).is_dir()
    run(parse_config(argv(out, "train_loss", *extra, str(out / "final"))))

    got, want = mixing_records(out), mixing_records(reference)
    assert sorted(want) == sorted(got)
    assert len(set(want["odm_ratio/hard"].values())) > 1  # the weights did move
    for name in want:  # every logged loss, ratio, reward and draw count, bit for bit
        assert got[name] == want[name], name
    final, expected = (
        load_file(out / "final" / "model.safetensors"),
        load_file(reference / "final" / "model.safetensors"),
    )
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
    assert math.isfinite(want["training_loss"][10])


@pytest.mark.slow
def test_two_processes_draw_and_mix_as_one(mixing_job):
    """Under ``accelerate launch`` (2 ranks, FSDP on CPU) every rank draws the one sequence and computes
    the same rewards: the same draws as one process with the same global batch, the same ratios."""
    from tests.test_distributed import accelerate_launch

    root, argv = mixing_job
    one, two = root / "one-process", root / "two-processes"
    common = ("--max_steps", "6", "--save_strategy", "no")
    run(parse_config(argv(one, "validation_loss", *common, "--per_device_train_batch_size", "4")))
    result = accelerate_launch(
        ["-m", "tuning.sft_trainer"],
        argv(two, "validation_loss", *common, "--per_device_train_batch_size", "2"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got, want = mixing_records(two), mixing_records(one)
    for name in ("odm_drawn/easy", "odm_drawn/hard"):
        assert got[name] == want[name], name
    for name in ("odm_ratio/easy", "odm_ratio/hard"):
        assert got[name] == pytest.approx(want[name], abs=1e-4), name
    assert len(set(want["odm_ratio/hard"].values())) > 1


def test_options_that_regroup_the_drawn_samples_are_refused(tmp_path):
    from types import SimpleNamespace

    from tuning.config import DataArgs
    from tuning.data import check_data_config
    from tuning.train.online_mixing import check_online_mixing

    config = str(odm_config(tmp_path))
    with pytest.raises(UserError, match="online data mixing draws samples one by one, and --packing"):
        check_data_config(DataArgs(data_config_path=config, packing=True), max_steps=0)
    check_data_config(DataArgs(data_config_path=config), max_steps=0)
    with pytest.raises(UserError, match="drop --max_tokens_per_batch"):
        check_online_mixing(SimpleNamespace(max_tokens_per_batch=512, train_sampling_strategy="random"))
    with pytest.raises(UserError, match="--train_sampling_strategy group_by_length cannot apply"):
        check_online_mixing(
            SimpleNamespace(max_tokens_per_batch=None, train_sampling_strategy="group_by_length")
        )


def test_a_bad_odm_value_exits_1_with_one_line_before_the_model_loads(tmp_path, capfd):
    config = odm_config(tmp_path, "  odm:\n    eta: -1\n")
    code = main(["--model_name_or_path", str(tmp_path / "no-model"), "--data_config_path", str(config)])
    err = capfd.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if "eta -1" in line]
    assert len(lines) == 1 and "dataprocessor.odm: eta -1 must be a positive number" in lines[0], err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["entropy", "entropy3_varent1", "entropy_last_token", "gradnorm"])
def test_every_other_reward_type_runs_and_moves_the_weights(mixing_job, reward):
    root, argv = mixing_job
    out = root / f"reward-{reward}"
    run(parse_config(argv(out, reward, "--max_steps", "4")))
    records = mixing_records(out)
    rewards = [records[f"odm_reward/{n}"][4] for n in ("easy", "hard")]
    assert all(r > 0 for r in rewards), rewards  # gradnorm: an arm never drawn at an update keeps 1e-100
    if reward != "gradnorm":
        assert all(r <= 1 for r in rewards), rewards  # entropies are normalised to [0, 1]
    assert records["odm_ratio/hard"][4] != 0.5
