"""Where a model or tokenizer comes from: a local folder (recorded as an absolute path, which every
adapter stores as its base) or a Hub id, and the one-line error when neither loads."""

from __future__ import annotations

import re
from pathlib import Path

from tuning.errors import UserError, first_line

# One part of a Hugging Face Hub repo id (``name`` or ``org/name``): huggingface_hub's validate_repo_id
# rule (word characters, "-" and "."; neither first nor last; at most 96; no "--" or "..")
_HUB_ID_PART = re.compile(r"\w(?:[\w.-]{0,94}\w)?")


def could_be_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (
        len(parts) <= 2
        and "--" not in name
        and ".." not in name
        and all(_HUB_ID_PART.fullmatch(p) for p in parts)
    )


def model_source(name: str) -> str:
    """What to load from: a local folder as an absolute path, a Hub id as given. What a model or tokenizer
    is loaded from is what peft records in every adapter (``base_model_name_or_path``): a path relative to
    the training run's folder would not load from anywhere else (``tuning merge`` from another folder)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def check_source(name: str, flag: str) -> None:
    """Refuse, without a network round trip, a model or tokenizer name that can only be a local path and
    does not exist (``./tiny-lama``, ``/data/models/x``): it can't be a Hub id either."""
    if not Path(name).expanduser().exists() and not could_be_hub_id(name):
        raise UserError(f"{flag} {name}: no such folder; check the path")


def source_error(name: str, flag: str, files: str, e: Exception, fix: str = "") -> UserError:
    """What to fix when a model or tokenizer does not load from ``name``: the folder lacks ``files``
    (``fix``: what else to pass), or there is no such folder and ``name`` is no Hub model this machine can
    reach (a typo, or offline)."""
    if Path(name).expanduser().exists():
        return UserError(f"cannot load {files} from {name} ({flag}): {first_line(e)}{fix}")
    text = str(e)
    offline = "offline" in text.lower() or "couldn't connect" in text or "connect" in text.lower()
    why = (
        "the Hub cannot be reached from here (offline)"
        if offline
        else f"the Hub has no such model ({first_line(e)})"
    )
    return UserError(
        f"{flag} {name}: no such local folder, and not a Hub id that can be loaded: {why}; check the "
        "spelling, or pass a local folder"
    )
