"""Neutral file helpers every stage may use: reading YAML/JSON mappings (also a job handed over in the
environment, fms-hf-tuning's convention), durable writes, checking a folder can be written before a run
starts, and naming a pickle torch refused to load.

Nothing here knows about configs, data or models; it imports only :mod:`tuning.errors`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from tuning.errors import UserError


def read_mapping_file(
    path: str | Path, what: str, shown: str | None = None, *, scalars_as_text: bool = False
) -> dict[str, Any]:
    """The mapping a YAML or JSON file holds (``.json`` is read as JSON, anything else as YAML, both
    without running code), or a UserError naming ``what`` and the file (``shown``: how the user typed it).
    Shared by ``--config``, data configs and launcher job files.

    ``scalars_as_text``: the top-level values (and the items of top-level lists) are returned as the
    text a command line would carry, for a parser that converts text itself: a YAML scalar as written
    (``yes`` stays ``"yes"``, ``1e-4`` stays ``"1e-4"``, which YAML 1.1 would read as a bool and a
    string), a JSON number or bool as its JSON text. ``null`` stays None; nested mappings keep their
    YAML/JSON types (they are JSON objects to the parser)."""
    file, shown = Path(path), shown or str(path)
    if not file.is_file():
        raise UserError(f"{what} {shown} does not exist; pass an existing YAML or JSON file")
    kind = "JSON" if file.suffix == ".json" else "YAML"
    try:
        text = file.read_text(encoding="utf-8")
        if kind == "JSON":
            values = json.loads(text)
            values = as_flag_text(values) if scalars_as_text and isinstance(values, dict) else values
        else:
            values = _yaml_as_text(text) if scalars_as_text else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{what} {shown} is not valid {kind}: {' '.join(str(e).split())}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UserError(
            f"{what} {shown} must hold a mapping of keys to values, not a {type(values).__name__}"
        )
    return values


_YAML_NULL = "tag:yaml.org,2002:null"


def _yaml_as_text(text: str) -> Any:
    """YAML read as nodes, so a scalar's source text survives YAML 1.1's implicit typing."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, yaml.MappingNode):
        return yaml.safe_load(text)  # empty, or not a mapping: the caller reports it
    constructor = yaml.SafeLoader("")

    def value(node: yaml.Node, top: bool) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return None if node.tag == _YAML_NULL else node.value
        if top and isinstance(node, yaml.SequenceNode):
            return [value(item, False) for item in node.value]
        return constructor.construct_object(node, deep=True)

    values: dict[str, Any] = {}
    for key_node, value_node in root.value:
        key = str(constructor.construct_object(key_node))
        if key in values:
            mark = key_node.start_mark
            raise yaml.YAMLError(f"key '{key}' appears twice (line {mark.line + 1}); keep one")
        values[key] = value(value_node, True)
    return values


def as_flag_text(values: dict[str, Any]) -> dict[str, Any]:
    """A typed mapping's top-level values (and list items) as the text a command line would carry:
    bools as true/false, numbers as their shortest exact text; mappings and None unchanged."""

    def text(v: Any) -> Any:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return v

    return {k: [text(x) for x in v] if isinstance(v, list) else text(v) for k, v in values.items()}


# fms-hf-tuning's job hand-over: a path to the job file, or the job itself as base64-encoded JSON (which wins
# when both are set, as in fms-hf-tuning's sft_trainer). Read by `sft_trainer` (no --config) and `tuning launch`.
JOB_PATH_ENV = "SFT_TRAINER_CONFIG_JSON_PATH"
JOB_TEXT_ENV = "SFT_TRAINER_CONFIG_JSON_ENV_VAR"
JOB_ENVS = (JOB_TEXT_ENV, JOB_PATH_ENV)
# a job file's mapping of `accelerate launch` flags: tuning launch's part; the trainer sets it aside
LAUNCH_ARGS_KEY = "accelerate_launch_args"


def job_from_environment(*, scalars_as_text: bool = False) -> tuple[str, dict[str, Any]] | None:
    """(where it came from, the job mapping) from ``$SFT_TRAINER_CONFIG_JSON_ENV_VAR`` or
    ``$SFT_TRAINER_CONFIG_JSON_PATH``; None when neither is set. ``scalars_as_text``: as in
    :func:`read_mapping_file`."""
    text = os.environ.get(JOB_TEXT_ENV, "").strip()
    if text:
        where = f"job ${JOB_TEXT_ENV}"
        values = decode_job_text(text, where)
        return where, as_flag_text(values) if scalars_as_text else values
    path = os.environ.get(JOB_PATH_ENV, "").strip()
    if path:
        where = f"job file {path} (${JOB_PATH_ENV})"
        shown = f"{path} (${JOB_PATH_ENV})"
        return where, read_mapping_file(path, "job file", shown, scalars_as_text=scalars_as_text)
    return None


def decode_job_text(text: str, where: str) -> dict[str, Any]:
    """A job given as base64-encoded JSON. Never a pickle (older fms-hf-tuning launchers accepted one):
    unpickling runs code."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(
            f"{where} is not base64: encode the job's JSON, e.g. base64.b64encode(json.dumps(job).encode())"
        ) from None
    if raw[:1] == b"\x80":  # the pickle protocol 2+ opcode
        raise UserError(
            f"{where} holds a pickle, which is never loaded (it runs code); encode the job as JSON"
        )
    try:
        values = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where} is not base64-encoded JSON: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise UserError(f"{where} must hold a JSON object of keys to values, not a {type(values).__name__}")
    return values


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # some filesystems (and Windows) can't fsync a directory; the rename is still atomic
    with contextlib.suppress(OSError):
        fsync_file(path)


# weight files of an earlier save that a new save in the same folder does not rewrite must go: a loader
# would otherwise find a stale shard (or a stale full model beside a new adapter)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin*", "adapter_model.bin")


def staging_folder(target: Path) -> Path:
    """An empty sibling of ``target`` to write into before :func:`publish_folder` (same filesystem, so the
    final rename is atomic); a leftover of an earlier attempt by this process is removed."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def publish_folder(tmp: Path, target: Path) -> Path:
    """Put the complete folder ``tmp`` in place as ``target``, so that a crash at any moment leaves either
    the old contents or the new files, never a half-written file where a loader would pick it up.

    Every file is flushed to disk first. A new ``target`` is one rename; an existing folder (a rerun, or
    a model saved into ``output_dir``) gets the new files renamed in one by one (each ``os.replace`` is
    atomic), and weight files of an earlier save that this one doesn't rewrite are removed.
    """
    for item in tmp.rglob("*"):
        if item.is_file():
            fsync_file(item)
    fsync_dir(tmp)
    if target.exists() and not target.is_dir():
        target.unlink()
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return target
    new = {item.name for item in tmp.iterdir()}
    for pattern in WEIGHT_PATTERNS:
        for stale in target.glob(pattern):
            if stale.name not in new:
                stale.unlink()
    for item in tmp.iterdir():
        destination = target / item.name
        if item.is_dir() and destination.is_dir():
            shutil.rmtree(destination)
        os.replace(item, destination)
    tmp.rmdir()
    fsync_dir(target)
    return target


# The longest path a run writes below its output folder ("checkpoint-N/...", temporary names), so a
# path that is itself under the system's limit is refused when the files inside it would not be.
PATH_HEADROOM = 128


def check_writable_folder(path: str | Path, flag: str) -> None:
    """Refuse, before anything is written, a folder a run could not write into: a name longer than the
    filesystem allows, a dangling symlink on the way, a file in its place, or a read-only or
    unwritable nearest existing folder. Nothing is created."""
    given = Path(path).expanduser()
    absolute = Path(os.path.abspath(given))
    anchor = next(p for p in absolute.parents if _exists(p))  # "/" at worst
    name_max = _pathconf(anchor, "PC_NAME_MAX", 255)
    path_max = _pathconf(anchor, "PC_PATH_MAX", 4096)
    for part in absolute.parts:
        if len(os.fsencode(part)) > name_max:
            raise UserError(
                f"{flag}: the folder name '{part[:24]}...' is {len(os.fsencode(part))} bytes, longer than "
                f"this filesystem allows ({name_max}); use a shorter name"
            )
    length = len(os.fsencode(str(given)))
    if length + PATH_HEADROOM > path_max:
        raise UserError(
            f"{flag} is {length} bytes long: with the files a run writes inside it, paths would pass the "
            f"system's limit of {path_max} bytes; use a shorter path"
        )
    for folder in (absolute, *absolute.parents):
        if folder.is_symlink() and not folder.exists():
            raise UserError(
                f"{flag} {path}: {folder} is a symlink to {os.readlink(folder)}, which does not exist; "
                "create its target or pass another folder"
            )
        if _exists(folder):
            if not folder.is_dir():
                raise UserError(f"{flag} {folder} is a file, not a folder; pass a folder path")
            if not os.access(folder, os.W_OK | os.X_OK):
                readonly = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
                why = "is on a read-only filesystem" if readonly else "is not writable by this user"
                raise UserError(f"{flag} {path} cannot be written: {folder} {why}; pass a writable folder")
            return


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long to stat, for one
        return False


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def refused_pickle(
    error: BaseException, where: str, fix: str = "use safetensors weights from a source you trust"
) -> UserError | None:
    """The UserError for a pickle file torch's weights-only loader refused (it holds objects other than
    tensors, which could run code when loaded; nothing ran), naming the file when the traceback shows
    it; None for any other error. ``where``: what was being loaded ("model folder X", "checkpoint Y")."""
    if not (isinstance(error, pickle.UnpicklingError) and "weights only load failed" in str(error).lower()):
        return None
    found = re.search(r"(unsupported GLOBAL [\w.]+|Unsupported global: GLOBAL [\w.]+)", str(error))
    what = f" ({found.group(1)})" if found else ""
    return UserError(
        f"refused to load {_pickled_file(error) or 'a pickle file'} from {where}: it holds Python objects "
        f"besides tensors{what}, which could run code when loaded, so torch's weights-only loader refused "
        f"it and nothing ran; {fix}"
    )


def _pickled_file(error: BaseException) -> str | None:
    """The path torch.load was reading, from its frame in the traceback."""
    tb = error.__traceback__
    found = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "load" and frame.f_code.co_filename.endswith("serialization.py"):
            f = frame.f_locals.get("f")
            found = str(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", found)
        tb = tb.tb_next
    return found


# below this much free space, a write that failed without an errno (torch's zip writer, safetensors)
# is taken to have run out of space
DISK_FULL_BYTES = 1 << 20
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: str | Path) -> int | None:
    """Space left for this user on the filesystem holding ``path`` (or its nearest existing folder)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        stat = os.statvfs(p)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def is_disk_full(error: BaseException, path: str | Path) -> bool:
    """Whether a failed write under ``path`` ran out of space: ENOSPC/EDQUOT anywhere in the exception
    chain, a message saying so, or (torch reports a full disk as "enforce fail at inline_container.cc:
    unexpected pos", safetensors as an I/O error) any write error with under 1 MiB left there."""
    chain, e = [], error
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(x, OSError) and x.errno in _NO_SPACE for x in chain):
        return True
    text = " ".join(str(x) for x in chain)
    if "No space left" in text or "StorageFull" in text:
        return True
    free = free_bytes(path)
    return free is not None and free < DISK_FULL_BYTES
