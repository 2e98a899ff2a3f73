"""Data paths → ``datasets.Dataset``: files by extension, folders, globs, else a hub dataset id."""

from __future__ import annotations

import codecs
import glob
import json
import logging
import os
from pathlib import Path

import datasets

from tuning.errors import UserError, excerpt, first_line

logger = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_GLOB_CHARS = set("*?[")


def resolve_files(path: str) -> list[Path] | None:
    """The data files ``path`` names, or None when it is a hub dataset id."""
    p = Path(path).expanduser()
    if _GLOB_CHARS & set(path):
        matches = [Path(f) for f in glob.glob(str(p), recursive=True)]
        files = sorted(f for f in matches if f.is_file() or _dangling(f))
        if not files:
            raise UserError(f"data path {path} matched no files; check the pattern")
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in BUILDERS)
        if not files:
            raise UserError(f"data folder {path} holds no {'/'.join(BUILDERS)} files")
    elif p.is_file() or _dangling(p):  # a dangling link is reported below, naming its target
        files = [p]
    elif p.suffix in BUILDERS or path.startswith((".", "/", "~")):
        raise UserError(f"data file {path} does not exist; check the path (relative to {Path.cwd()})")
    else:
        return None
    for f in files:
        if _dangling(f):
            raise UserError(
                f"data file {f} is a symlink to {os.readlink(f)}, which does not exist; fix the link or "
                "pass the file itself"
            )
    unsupported = [f for f in files if f.suffix not in BUILDERS]
    if unsupported:
        raise UserError(
            f"data file {unsupported[0]} has an unsupported extension; use one of {', '.join(BUILDERS)}"
        )
    builders = {BUILDERS[f.suffix] for f in files}
    if len(builders) > 1:
        raise UserError(f"data path {path} mixes formats ({', '.join(sorted(builders))}); use one format")
    return files


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def load_data(path: str) -> datasets.Dataset:
    """Load one data path (file, folder, glob or hub id) as a single training split."""
    files = resolve_files(path)
    if files is None:
        return _load_hub_dataset(path)
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"data file {f} is empty; it needs at least one row")
    builder = BUILDERS[files[0].suffix]
    if builder in ("json", "csv"):
        for f in files:
            _check_utf8(f)
    # datasets logs its own multi-line error before raising; we explain the failure in one line instead
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # datasets wraps parse errors in several types; find the real cause ourselves
        raise UserError(explain_load_failure(files, builder, e)) from None
    finally:
        datasets.logging.set_verbosity(level)
    if len(ds) == 0:
        raise UserError(f"data path {path} has no rows; it needs at least one")
    logger.info("loaded %d rows from %s (%s)", len(ds), path, builder)
    return ds


def _load_hub_dataset(name: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, split="train")
    except Exception as e:
        raise UserError(
            f"could not load dataset '{name}': it is not a local file or folder, and as a hub id it "
            f"failed ({type(e).__name__}: {first_line(e)}); check the path"
        ) from None


def _check_utf8(path: Path, chunk_size: int = 1 << 24) -> None:
    """pyarrow silently replaces invalid bytes in text files; a user should hear about them instead."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                pos = offset + e.start
                line = lines + chunk[: e.start].count(b"\n")
                raise UserError(
                    f"data file {path} is not UTF-8 text (byte {pos}, line {line}); re-encode it as UTF-8"
                ) from None
            offset += len(chunk)
            lines += chunk.count(b"\n")


def explain_load_failure(files: list[Path], builder: str, error: Exception) -> str:
    """One line naming the file, the line and the cause of a failed load. Causes are clipped: a parser's
    message can quote the row it choked on, and data may hold secrets."""
    if builder in ("parquet", "arrow"):
        for f in files:
            problem = _binary_problem(f, builder)
            if problem:
                return (
                    f"data file {f} is not a readable {builder} file ({problem.rstrip('.')}): it is damaged, "
                    f"truncated (a copy or download cut short?) or not {builder} at all; write or copy it again"
                )
        return f"could not read data {', '.join(map(str, files))} as {builder}: {excerpt(first_line(error))}"
    for f in files:
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            return f"data file {f} is not UTF-8 text (byte {e.start}, line {line}); re-encode it as UTF-8"
        if builder == "json":
            if not text.strip("[] \n\r\t"):
                return f"data file {f} has no rows; it needs at least one"
            problem = _json_problem(text)
            if problem:
                return f"data file {f} is malformed: {problem}; fix the JSON there"
    return f"could not read data {', '.join(map(str, files))} as {builder}: {excerpt(first_line(error))}"


def _binary_problem(path: Path, builder: str) -> str | None:
    """Why pyarrow cannot read a parquet or Arrow file whole, or None if it can."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if builder == "parquet":  # only after a failed load: reading it whole is the diagnosis
            with open(path, "rb") as f:
                if f.read(4) != b"PAR1":
                    return "it does not start with the parquet magic bytes PAR1"
            pq.read_table(path)
            return None
        with open(path, "rb") as f:
            try:
                pa.ipc.open_stream(f).read_all()  # what datasets' arrow builder reads
            except pa.ArrowInvalid:
                f.seek(0)
                pa.ipc.open_file(f).read_all()
        return None
    except (pa.ArrowException, OSError) as e:
        return first_line(e)


def _json_problem(text: str) -> str | None:
    """Where a JSON array or JSON-lines text fails to parse or to load as a table (a lone UTF-16
    surrogate, a column whose type changes between rows), or None if it loads."""
    stripped = text.lstrip()
    shape = _RowShape()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno} column {e.colno}: {e.msg}"
        for i, row in enumerate(rows):
            problem = "is not an object" if not isinstance(row, dict) else shape.problem(row, f"item {i}")
            if problem:
                return f"item {i} of the array {problem}"
        return None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {lineno} column {e.colno}: {e.msg}"
        problem = (
            "is not a JSON object" if not isinstance(row, dict) else shape.problem(row, f"line {lineno}")
        )
        if problem:
            return f"line {lineno} {problem}"
    return None


_KINDS = (
    (bool, "true/false"),
    ((int, float), "a number"),
    (str, "text"),
    (list, "a list"),
    (dict, "an object"),
)


class _RowShape:
    """What a table loader needs of JSON rows beyond parsing: text that is valid Unicode, and each
    column of one kind (Arrow types a column by its values)."""

    def __init__(self) -> None:
        self.kinds: dict[str, tuple[str, str]] = {}

    def problem(self, row: dict, where: str) -> str | None:
        bad = _lone_surrogate(row)
        if bad is not None:
            return (
                f"holds a lone UTF-16 surrogate (\\u{ord(bad):04x}) in column '{_column_of(row, bad)}', which "
                "is not valid Unicode; remove or replace it"
            )
        for key, value in row.items():
            if value is None:
                continue
            kind = next(name for types, name in _KINDS if isinstance(value, types))
            seen = self.kinds.setdefault(key, (kind, where))
            if seen[0] != kind:
                return f"has {kind} in column '{key}' where {seen[1]} has {seen[0]}; use one kind per column"
        return None


def _lone_surrogate(value: object) -> str | None:
    """The first lone surrogate in a parsed JSON value (``json`` accepts ``\\ud800``; UTF-8 cannot hold it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return value[e.start]
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        found = _lone_surrogate(item)
        if found is not None:
            return found
    return None


def _column_of(row: dict, char: str) -> str:
    return next((k for k, v in row.items() if _lone_surrogate(v) == char), "?")
