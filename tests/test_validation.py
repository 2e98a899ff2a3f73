"""Every value validated the same way wherever it comes from. These tests iterate over every flag of
every argument group (not a few examples): a config-file value must parse to exactly what the same
flag parses to, or be refused the same way; every numeric field has a range rule that both sources
hit; text that can't be empty is refused empty."""

from __future__ import annotations

import argparse
import enum
import json
import math
import re
import typing

import pytest
import yaml
from transformers import TrainingArguments

from tuning.config import parse_config
from tuning.config.args import float_fields, text_fields
from tuning.config.parser import ARG_GROUPS, build_parser, field_hints, load_config_file, resolved_config_dict
from tuning.config.rules import BOUNDS, SEED_MAX, is_number
from tuning.errors import UserError

BASE = ["--model_name_or_path", "m", "--training_data_path", "d.json", "--output_dir"]
# texts a user may write for any flag: numbers of each shape, negatives, non-finite, bools, words, JSON
TEXTS = ["0", "1", "-1", "2.5", "1e-4", "-1e-4", "nan", "inf", "true", "no", "abc", '{"a": 1}', "x y"]


PARSER = build_parser()  # one for every check here (parse_config builds its own)


def flag_actions() -> dict[str, argparse.Action]:
    actions: dict[str, argparse.Action] = {}
    for action in PARSER._actions:
        if action.dest not in ("help", "config"):
            actions.setdefault(action.dest, action)
    return actions


ACTIONS = flag_actions()


def representatives() -> list[str]:
    """One flag per kind (type hint, number of values, converter, choices): the fast tier's sample;
    the slow tier runs the same checks on every flag."""
    kinds: dict[tuple, str] = {}
    for dest, action in sorted(ACTIONS.items()):
        kind = (
            str(field_hints()[dest]),
            action.nargs,
            getattr(action.type, "__name__", ""),
            bool(action.choices),
        )
        kinds.setdefault(kind, dest)
    return sorted(kinds.values())


SAMPLE = representatives()


def texts_for(action: argparse.Action) -> list[str]:
    return TEXTS + [str(c) for c in (action.choices or [])][:2]


def cli_value(dest: str, texts: list[str]):
    """What the command line makes of ``--dest TEXT...`` (the namespace value), or the error text."""
    action = ACTIONS[dest]
    argv = [f"--{dest}", *texts] if action.nargs == "+" else [f"--{dest}={texts[0]}"]
    try:
        namespace, _ = PARSER.parse_known_args(argv, namespace=argparse.Namespace())
    except Exception as e:  # noqa: BLE001 (the outcome is compared, whatever it is)
        return ("refused", type(e).__name__)
    return ("ok", getattr(namespace, dest))


def file_value(tmp_path, dest: str, value, suffix: str = ".yaml"):
    path = tmp_path / f"c{suffix}"
    text = json.dumps({dest: value}) if suffix == ".json" else yaml.safe_dump({dest: value})
    path.write_text(text)
    try:
        return ("ok", load_config_file(str(path), PARSER)[dest])
    except UserError as e:
        return ("refused", str(e))


def same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "refused":
        return True
    x, y = a[1], b[1]
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x):
        return math.isnan(y)
    return x == y and type(x) is type(y)


def check_conversion(dest: str, tmp_path) -> None:
    """Quoted text in YAML and in JSON: the same conversion (type, choices) as the flag, for every text."""
    action = ACTIONS[dest]
    for text in texts_for(action):
        expected = cli_value(dest, [text])
        got_yaml, got_json = file_value(tmp_path, dest, text), file_value(tmp_path, dest, text, ".json")
        assert same(expected, got_yaml), (dest, text, expected, got_yaml)
        assert same(expected, got_json), (dest, text, expected, got_json)
        if got_yaml[0] == "refused":
            assert got_yaml[1].startswith(f"config file {tmp_path / 'c.yaml'}: {dest}: "), got_yaml[1]


def check_shapes(dest: str, tmp_path) -> None:
    """null, lists and mappings (no flag can spell them): allowed exactly where the field's type allows."""
    action, hint = ACTIONS[dest], field_hints()[dest]
    members = typing.get_args(hint) or (hint,)
    origins = {typing.get_origin(m) or m for m in members}
    got = file_value(tmp_path, dest, None)
    if type(None) in origins:
        assert got == ("ok", None), dest
    else:
        assert got[0] == "refused" and "null is not allowed" in got[1], (dest, got)
    # a list: the flag's own list, or refused where the field holds one value
    sample = [str(c) for c in (action.choices or ["1", "2"])][:2]
    got = file_value(tmp_path, dest, sample)
    if action.nargs == "+":
        assert same(got, cli_value(dest, sample)), (dest, got)
    elif list not in origins:
        assert got[0] == "refused" and "a list is not allowed" in got[1], (dest, got)
    # a mapping: the JSON object the flag takes, or refused
    got = file_value(tmp_path, dest, {"a": 1})
    if dict in origins and action.nargs is None:
        assert got == ("ok", {"a": 1}) == cli_value(dest, ['{"a": 1}']), (dest, got)
    else:
        assert got[0] == "refused", (dest, got)


CHECKS = {"conversion": check_conversion, "shapes": check_shapes}


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("dest", SAMPLE)
def test_file_values_of_one_flag_per_kind(check, dest, tmp_path):
    CHECKS[check](dest, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS)
def test_file_values_of_every_flag(check, tmp_path):
    for dest in sorted(ACTIONS):
        CHECKS[check](dest, tmp_path)


def test_yaml_scalars_reach_the_parser_as_written(tmp_path, base):
    """YAML 1.1 would make `yes` a bool and `1e-4` a string; the parser sees the text, as from a shell."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "response_template: yes\nlearning_rate: 1e-4\npacking: yes\nlora_r: '16'\ntarget_modules: q_proj\n"
    )
    config = parse_config([*base, "--config", str(cfg)])
    assert config.data.response_template == "yes"
    assert config.train.learning_rate == 1e-4
    assert config.data.packing is True
    assert config.peft.lora_r == 16
    assert config.peft.target_modules == ["q_proj"]  # one item, as --target_modules q_proj gives
    cfg.write_text("learning_rate: 1\nlearning_rate: 2\n")
    with pytest.raises(UserError, match=r"key 'learning_rate' appears twice \(line 2\)"):
        parse_config([*base, "--config", str(cfg)])


@pytest.fixture
def base(tmp_path) -> list[str]:
    return [*BASE, str(tmp_path / "out")]


def without(argv: list[str], name: str) -> list[str]:
    """``argv`` less ``--name VALUE``: a flag on the command line would override the file's value."""
    if f"--{name}" not in argv:
        return argv
    i = argv.index(f"--{name}")
    return argv[:i] + argv[i + 2 :]


def numeric_members(hint) -> set:
    found = set()
    for member in typing.get_args(hint) or (hint,):
        for inner in typing.get_args(member) or (member,):
            if inner in (int, float):
                found.add(inner)
    return found


def test_every_numeric_field_of_every_group_has_a_range_rule():
    numeric = {name for name, hint in field_hints().items() if numeric_members(hint)}
    assert numeric - set(BOUNDS) == set(), "add a rule to tuning/config/rules.py::BOUNDS"
    assert set(BOUNDS) - numeric == set(), "a rule for a field that is gone"


def outside_and_inside(name: str) -> tuple[list, list]:
    """Values just past each end of the field's range (and non-finite floats), and values at the ends."""
    bounds, is_float = BOUNDS[name], float in numeric_members(field_hints()[name])
    step = 0.5 if is_float else 1
    outside, inside = [], []
    if bounds.low is not None:
        outside.append(bounds.low if bounds.low_open else bounds.low - step)
        inside.append(bounds.low + step if bounds.low_open else bounds.low)
    if bounds.high is not None:
        outside.append(bounds.high if bounds.high_open else bounds.high + step)
        inside.append(bounds.high - step / 10 if bounds.high_open else bounds.high)
    if is_float:
        outside += [math.nan, math.inf, -math.inf]
    return [float(v) if is_float else int(v) for v in outside], [
        float(v) if is_float else int(v) for v in inside
    ]


# flags a value at the end of a range needs so that no other rule refuses the command
COMPANIONS = {
    "dataloader_prefetch_factor": ["--dataloader_num_workers", "1"],
    "num_train_epochs": ["--max_steps", "1"],
    "max_tokens_per_batch": ["--max_seq_length", "1"],
    "logging_steps": ["--logging_strategy", "epoch"],
    "save_steps": ["--save_strategy", "epoch"],
    "eval_steps": ["--eval_strategy", "no"],
    "early_stopping_patience": ["--eval_strategy", "epoch"],
    "eval_generations": ["--eval_strategy", "epoch"],
}


def as_text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def flag_argv(name: str, value) -> list[str]:
    return [f"--{name}", as_text(value)]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_every_range_is_enforced_for_flags_and_files(name, base, tmp_path):
    outside, inside = outside_and_inside(name)
    cfg = tmp_path / "c.yaml"
    for value in outside:
        with pytest.raises(UserError, match=rf"^--{name} is \S+ \(command line\): it must be "):
            parse_config([*base, *COMPANIONS.get(name, []), *flag_argv(name, value)])
        cfg.write_text(f"{name}: {as_text(value)}\n")
        with pytest.raises(
            UserError, match=rf"^--{name} is \S+ \(config file {re.escape(str(cfg))}\): it must be "
        ):
            parse_config([*base, *COMPANIONS.get(name, []), "--config", str(cfg)])
    for value in inside:
        config = parse_config([*base, *COMPANIONS.get(name, []), *flag_argv(name, value)])
        assert name in resolved_config_dict(config)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_groups_built_directly_check_the_same_ranges(name):
    cls = next(c for c in ARG_GROUPS.values() if name in typing.get_type_hints(c))
    bad = outside_and_inside(name)[0][0]
    value = (
        [bad]
        if typing.get_origin(field_hints()[name]) is not None
        and list in {typing.get_origin(m) for m in typing.get_args(field_hints()[name])}
        else bad
    )
    extra = {"output_dir": "o"} if issubclass(cls, TrainingArguments) else {}
    with pytest.raises(UserError, match=rf"^--{name} is "):
        cls(**extra, **{name: value})


FLOATS = sorted(set().union(*(float_fields(c) for c in ARG_GROUPS.values())))


@pytest.mark.parametrize("name", FLOATS)
def test_a_negative_number_is_a_value_not_a_flag(name, base):
    """argparse reads -1e-4 as an unknown flag; the range check must get to say what is wrong."""
    with pytest.raises(
        UserError, match=rf"^--{name} is -0.0001 \(command line\): it must be a finite number"
    ):
        parse_config([*base, f"--{name}", "-1e-4"])
    with pytest.raises(UserError, match=rf"^--{name} is -inf \(command line\)"):
        parse_config([*base, f"--{name}", "-inf"])


TEXT_FIELDS = sorted({n for c in ARG_GROUPS.values() for n in text_fields(c)})


@pytest.mark.parametrize("name", TEXT_FIELDS)
def test_empty_text_is_refused_from_both_sources(name, base, tmp_path):
    action = ACTIONS[name]
    base = without(base, name)
    argv = [f"--{name}", ""] if action.nargs == "+" else [f"--{name}="]
    with pytest.raises(UserError, match=rf"^--{name} is (empty|a list with an empty item) \(command line\)"):
        parse_config([*base, *argv])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{name}: ''\n")
    with pytest.raises(UserError, match=rf"^--{name} is (empty|a list with an empty item) \(config file "):
        parse_config([*base, "--config", str(cfg)])


def test_text_fields_are_ours_and_cover_the_templates():
    assert {"response_template", "instruction_template", "data_formatter_template", "chat_template"} <= set(
        TEXT_FIELDS
    )
    assert "output_dir" not in TEXT_FIELDS and "report_to" not in TEXT_FIELDS  # Hugging Face's own


def enum_fields() -> dict[str, type]:
    out = {}
    for name, hint in typing.get_type_hints(TrainingArguments).items():
        for member in typing.get_args(hint) or (hint,):
            for inner in typing.get_args(member) or (member,):
                if isinstance(inner, type) and issubclass(inner, enum.Enum):
                    out[name] = inner
    return out


def test_every_enum_field_of_training_arguments_keeps_its_values():
    """Our overrides retype some (save_strategy, logging_strategy, optim) as str: the choices must
    survive. (A list of an enum, --debug, is converted by the enum itself.)"""
    fields = enum_fields()
    assert {"save_strategy", "logging_strategy", "optim", "lr_scheduler_type", "eval_strategy"} <= set(fields)
    for name, enum_type in fields.items():
        action = ACTIONS[name]
        if action.choices is None:
            assert action.type is enum_type, name
        else:
            assert [str(c) for c in action.choices] == [e.value for e in enum_type], name


@pytest.mark.parametrize(("name", "enum_type"), sorted(enum_fields().items()))
def test_a_bad_enum_value_in_a_file_is_refused(name, enum_type, base, tmp_path):
    typo = next(iter(enum_type)).value[:-1] + "x"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{name}: {typo}\n")
    refused = rf"invalid (choice|{enum_type.__name__} value): '{re.escape(typo)}'"
    with pytest.raises(UserError, match=rf"^config file .*: {name}: {refused}"):
        parse_config([*base, "--config", str(cfg)])


def test_choices_of_our_literal_fields_hold_for_direct_construction():
    from tuning.config.args import DataArgs, PeftArgs

    with pytest.raises(UserError, match=r"--peft_method is 'lorra': choose one of none, lora"):
        PeftArgs(peft_method="lorra")
    with pytest.raises(UserError, match=r"--data_format is 'bogus'"):
        DataArgs(data_format="bogus")


def test_step_counts_must_be_positive_with_their_strategy(base, tmp_path):
    for steps, strategy in (("save_steps", "save_strategy"), ("logging_steps", "logging_strategy")):
        with pytest.raises(UserError, match=rf"--{steps} is 0 \(command line\) with --{strategy} steps"):
            parse_config([*base, f"--{steps}", "0"])  # the count alone implies the steps strategy
        assert getattr(parse_config([*base, f"--{steps}", "0", f"--{strategy}", "epoch"]).train, steps) == 0
    with pytest.raises(UserError, match=r"--eval_steps is 0 \(command line\) with --eval_strategy steps"):
        parse_config([*base, "--eval_steps", "0", "--eval_strategy", "steps"])


def test_token_budget_must_hold_the_longest_sample(base):
    with pytest.raises(UserError, match=r"--max_tokens_per_batch 1000 is smaller than --max_seq_length 1024"):
        parse_config([*base, "--max_tokens_per_batch", "1000", "--max_seq_length", "1024"])
    assert parse_config([*base, "--max_tokens_per_batch", "1024", "--max_seq_length", "1024"])


def test_seed_range_is_numpys(base):
    assert parse_config([*base, "--seed", str(SEED_MAX)]).train.seed == SEED_MAX
    with pytest.raises(UserError, match=r"--seed is 4294967296 .*in \[0, 4294967295\]"):
        parse_config([*base, "--seed", str(SEED_MAX + 1)])


@pytest.mark.slow
@pytest.mark.parametrize("dest", sorted(ACTIONS))
def test_whole_parse_from_a_file_equals_the_flag(dest, base, tmp_path):
    """End to end (range rules, dataclass checks, resolved config): a file value and the same flag give
    the same job or are both refused as user errors, for every flag and every text."""
    action, base = ACTIONS[dest], without(base, dest)
    cfg = tmp_path / "c.yaml"
    for text in texts_for(action):
        argv = [f"--{dest}", text] if action.nargs == "+" else [f"--{dest}={text}"]
        cfg.write_text(yaml.safe_dump({dest: text}))
        outcomes = []
        for extra in (argv, ["--config", str(cfg)]):
            try:
                outcomes.append(("ok", resolved_config_dict(parse_config([*base, *extra]))))
            except UserError:
                outcomes.append(("refused", None))
            except Exception as e:  # noqa: BLE001
                outcomes.append(("crash", type(e).__name__))
        assert outcomes[0] == outcomes[1], (dest, text, outcomes)


def test_is_number_excludes_bools():
    assert is_number(1) and is_number(1.5) and not is_number(True)


def test_config_file_found_by_a_prefix_of_its_flag(base, tmp_path):
    """--conf is --config by argparse's abbreviation rule: the file must be read, not ignored."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.125\n")
    assert parse_config([*base, "--conf", str(cfg)]).train.learning_rate == 0.125
    assert parse_config([*base, f"--config={cfg}", "--learning_rate=0.5"]).train.learning_rate == 0.5


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1])
def test_data_config_seed_has_the_seed_range(seed, tmp_path):
    from tuning.data.data_config import load_data_config

    config = tmp_path / "data.yaml"
    config.write_text(f"dataprocessor:\n  seed: {seed}\ndatasets:\n  - name: a\n    data_paths: [x.jsonl]\n")
    with pytest.raises(UserError, match=rf"dataprocessor seed {seed} is out of range; use a whole number in"):
        load_data_config(str(config))


def test_a_job_in_the_environment_goes_through_the_same_checks(base, tmp_path, monkeypatch):
    import base64

    def job(values: dict) -> None:
        monkeypatch.setenv(
            "SFT_TRAINER_CONFIG_JSON_ENV_VAR", base64.b64encode(json.dumps(values).encode()).decode()
        )

    job({"learning_rate": 0.25, "packing": True, "target_modules": "q_proj"})
    config = parse_config(base)
    assert (config.train.learning_rate, config.data.packing, config.peft.target_modules) == (
        0.25,
        True,
        ["q_proj"],
    )
    job({"peft_method": "lorra"})
    with pytest.raises(
        UserError, match=r"^job \$SFT_TRAINER_CONFIG_JSON_ENV_VAR: peft_method: invalid choice: 'lorra'"
    ):
        parse_config(base)
    job({"learning_rate": -1})
    with pytest.raises(UserError, match=r"^--learning_rate is -1 \(job \$SFT_TRAINER_CONFIG_JSON_ENV_VAR\)"):
        parse_config(base)
    monkeypatch.delenv("SFT_TRAINER_CONFIG_JSON_ENV_VAR")
    path = tmp_path / "job.yaml"
    path.write_text("response_template: yes\nlearning_rate: 1e-4\n")
    monkeypatch.setenv("SFT_TRAINER_CONFIG_JSON_PATH", str(path))
    config = parse_config(base)
    assert (config.data.response_template, config.train.learning_rate) == ("yes", 1e-4)
