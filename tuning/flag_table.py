"""The command line's flags without the training stack: ``--help`` and an unknown flag answered in a
fraction of a second instead of the seconds that importing transformers, peft and torch takes (the parser
is built from transformers' ``TrainingArguments``; docs/performance.md, start-up).

The table is the real parser (``tuning/config/parser.py``) written down. Each time that parser is built
it stores its flags here, in a cache file keyed by everything the flags depend on: our config code and
the installed versions of transformers, peft and accelerate. With a table for this key, the entry points
rebuild the same parser with plain argparse before importing anything heavy: ``--help`` prints the same
text, and a command line whose only fault is an unknown flag gets the same error line. Anything else
(no table yet, a ``--config`` file or a job in the environment, a bad value) goes the full way, which
is always the reference.

Why our own: argparse has no way to save a parser, and Hugging Face's parser exists only as code that
imports transformers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tuning.compat import argparse as argparse_private
from tuning.errors import UserError, did_you_mean, run_command
from tuning.files import job_from_environment, read_mapping_file

# what the flags depend on besides our config code: TrainingArguments' fields, and what they import
_LIBRARIES = ("transformers", "peft", "accelerate")
_CONFIG_CODE = Path(__file__).resolve().parent / "config"
_SUPPRESS = "==SUPPRESS=="  # argparse.SUPPRESS's value, spelled out for the JSON
_GIVEN = "-given"  # where the rebuilt parser notes the flags given (no flag's destination has a dash)
# fms-hf-tuning's job in the environment (tuning/config/fms.py): its keys are checked the full way
_JOB_VARIABLES = ("SFT_TRAINER_CONFIG_JSON_ENV_VAR", "SFT_TRAINER_CONFIG_JSON_PATH")


def cache_dir() -> Path:
    """``$TUNING_CACHE_DIR``, else ``$XDG_CACHE_HOME/tuning`` (``~/.cache/tuning``)."""
    if os.environ.get("TUNING_CACHE_DIR"):
        return Path(os.environ["TUNING_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuning"


def table_key() -> str:
    """A digest of what the flags depend on; reading it costs a few small files, not an import."""
    digest = hashlib.sha256()
    for path in sorted(_CONFIG_CODE.glob("*.py")) + [Path(__file__)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for library in _LIBRARIES:
        try:
            digest.update(f"{library}={version(library)}".encode())
        except PackageNotFoundError:
            digest.update(f"{library}=none".encode())
    digest.update(sys.version.split()[0].encode())  # argparse's wording and layout change with Python
    return digest.hexdigest()[:20]


def table_path() -> Path:
    return cache_dir() / f"flags-{table_key()}.json"


def describe(parser: argparse.ArgumentParser, translated: list[str]) -> dict[str, Any]:
    """The table of ``parser``: what ``--help`` prints and what a flag consumes. ``translated``: the old and
    foreign flag names the command line rewrites before parsing (tuning/config/fms.py)."""

    def action(a: argparse.Action) -> dict[str, Any]:
        return {
            "option_strings": list(a.option_strings),
            "dest": a.dest,
            "nargs": a.nargs,
            "help_action": argparse_private.is_help(a),
            "default": _SUPPRESS if a.default == argparse.SUPPRESS else str(a.default),
            "help": a.help,
            "choices": None if a.choices is None else [str(c) for c in a.choices],
            "required": a.required,
        }

    if getattr(argparse, parser.formatter_class.__name__, None) is not parser.formatter_class:
        raise ValueError("flag table: a help formatter that is not argparse's own")
    for a in argparse_private.actions(parser):
        # what this table cannot carry; the full parser answers for such a parser
        if a.metavar is not None or (a.help and "%(" in a.help.replace("%(default)s", "")):
            raise ValueError(f"flag table: {a.dest} needs a metavar or help fields the table lacks")
    return {
        "usage": parser.usage,
        "description": parser.description,
        "epilog": parser.epilog,
        "formatter": parser.formatter_class.__name__,
        "groups": [
            {"title": g.title, "description": g.description}
            | {"actions": [action(a) for a in argparse_private.group_actions(g)]}
            for g in argparse_private.action_groups(parser)
        ],
        "translated": sorted(translated),
    }


def store(parser: argparse.ArgumentParser, translated: list[str]) -> None:
    """Write the table for this key once (best effort: a read-only or full cache only costs speed)."""
    path = table_path()
    if path.exists():
        return
    try:
        table = describe(parser, translated)
    except ValueError:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(table), encoding="utf-8")
        os.replace(partial, path)  # whole or absent, with several ranks writing at once
    except OSError:
        pass


def load() -> dict[str, Any] | None:
    try:
        return json.loads(table_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class _Given(argparse.Action):
    """A flag of the rebuilt parser: consumes what the real one consumes, converts and checks nothing."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        vars(namespace).setdefault(_GIVEN, set()).add(self.dest)


class _Unsure(Exception):
    """The rebuilt parser met something only the full parser can judge."""


class _Rebuilt(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _Unsure(message)


def rebuild(table: dict[str, Any], prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with the real one's flags, groups and help text, from its table."""
    parser = _Rebuilt(
        prog=prog,
        usage=table["usage"],
        description=table["description"],
        epilog=table["epilog"],
        formatter_class=getattr(argparse, table["formatter"]),
        add_help=False,
        allow_abbrev=True,
    )
    own = argparse_private.action_groups(parser)  # argparse's two, kept in their places
    for index, spec in enumerate(table["groups"]):
        group = own[index] if index < len(own) else parser.add_argument_group()
        group.title, group.description = spec["title"], spec["description"]
        for a in spec["actions"]:
            options = {"default": argparse.SUPPRESS if a["default"] == _SUPPRESS else a["default"]}
            options["help"] = a["help"]
            if a["help_action"]:
                group.add_argument(*a["option_strings"], action="help", **options)
                continue
            options |= {"nargs": a["nargs"], "choices": a["choices"], "required": a["required"]}
            group.add_argument(*a["option_strings"], action=_Given, dest=a["dest"], **options)
    return parser


def unknown_flag(flag: str, dests: list[str]) -> UserError:
    """The error for a flag no parser knows (the same line from the table and from the full parser)."""
    return UserError(f"unknown flag {flag}{did_you_mean(flag.split('=')[0], dests, flag=True)}; see --help")


def answer_early(argv: list[str]) -> int | None:
    """Answer ``argv`` from the table when that is all it needs: print ``--help`` (0), or the unknown-flag
    error line (1, as the full path ends). None: the full parser must look (no table, a file, a bad value)."""
    table = load()
    try:
        parser = rebuild(table)  # type: ignore[arg-type]
        kept = _without_translated(argv, set(table["translated"]))  # type: ignore[index]
    except (TypeError, KeyError, ValueError, AttributeError):  # no table, or not one this code wrote
        return None
    try:
        namespace, remaining = parser.parse_known_args(kept, namespace=argparse.Namespace())
    except _Unsure:
        return None
    except SystemExit as e:  # the help action printed the help
        return e.code if isinstance(e.code, int) else 0
    if "config" in vars(namespace).get(_GIVEN, ()) or any(os.environ.get(v) for v in _JOB_VARIABLES):
        return None
    flag = next((r for r in remaining if r.startswith("-")), None)
    if flag is None:
        return None
    dests = [a["dest"] for g in table["groups"] for a in g["actions"] if a["dest"] not in ("help", "config")]
    error = unknown_flag(flag, dests)

    def refuse() -> int:
        raise error

    return run_command(refuse, lambda: output_dir_of(argv, parser))  # error.log where the full path puts it


def peek(argv: list[str], dest: str, parser: argparse.ArgumentParser) -> str | None:
    """The value given for ``--dest`` on a command line that may not parse: the exact flag, ``--dest=V``
    or a unique prefix of it (argparse's abbreviation rule over ``parser``'s flags). The last one wins."""
    options = [o for a in argparse_private.actions(parser) for o in a.option_strings if o.startswith("--")]
    target, found = f"--{dest}", None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if not name.startswith("--"):
            continue
        matches = [o for o in options if o.startswith(name)]
        if name == target or matches == [target]:
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def output_dir_of(argv: list[str], parser: argparse.ArgumentParser) -> str | None:
    """``--output_dir`` of a command line, or of its ``--config`` file (or the job in the environment)."""
    given = peek(argv, "output_dir", parser)
    if given:
        return given
    config_file = peek(argv, "config", parser)
    try:
        if config_file:
            values = read_mapping_file(config_file, "config file")
        else:
            values = (job_from_environment() or ("", {}))[1]
    except UserError:
        return None
    value = values.get("output_dir")
    return value if isinstance(value, str) else None


def _without_translated(argv: list[str], translated: set[str]) -> list[str]:
    """``argv`` less each old or foreign flag and its values (the tokens up to the next ``--`` flag), as
    the full path rewrites them (tuning/config/fms.py ``translate_argv``)."""
    out: list[str] = []
    skipping = False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg.partition("=")[0][2:] in translated
        if not skipping:
            out.append(arg)
    return out
