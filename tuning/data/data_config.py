"""Data configs (``--data_config_path``): several datasets, each a chain of named handlers, mixed.

The file is read and validated whole before any data is touched: unknown keys, handlers and handler
arguments are errors naming the file, the dataset and the key, with the closest valid name. Configs
written for fms-hf-tuning run unchanged (its old argument names are accepted with a warning).

This module is the file's schema and its validation; ``config_datasets`` runs a dataset's handlers and
``mixing`` splits and mixes the results. After its handlers, a dataset goes through the same last step
as ``--training_data_path`` data (:func:`tuning.data.prepare.prepare`): tokenized rows are truncated to ``max_seq_length`` and rows with
nothing to train are dropped and counted; text rows are formatted and masked by the CLI's rules.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import logging
import typing
from dataclasses import MISSING, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import datasets

from tuning.config import SEED_MAX
from tuning.data.handlers import Handler, get_handler, resolve_kwargs
from tuning.data.handlers.registry import type_matches
from tuning.data.odm import OdmConfig, check_odm
from tuning.errors import UserError, did_you_mean
from tuning.files import read_mapping_file

logger = logging.getLogger(__name__)

# ``datasets``' own map/filter keywords a config may pass through (num_proc, batch_size, ...).
OWN_KEYWORDS = {"self", "function", "fn_kwargs", "batched", "remove_columns", "with_indices", "with_rank"}
MAP_KEYWORDS = set(inspect.signature(datasets.Dataset.map).parameters) - OWN_KEYWORDS
FILTER_KEYWORDS = set(inspect.signature(datasets.Dataset.filter).parameters) - OWN_KEYWORDS


@dataclass
class HandlerStep:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    # resolved from ``arguments`` by validation:
    handler: Handler | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    map_kwargs: dict[str, Any] = field(default_factory=dict)
    remove_columns: str | list[str] | None = None


@dataclass
class DatasetConfig:
    name: str
    data_paths: list[str]
    builder: Literal["json", "parquet", "arrow", "csv", "text"] | None = None
    sampling: float | None = None
    split: dict[str, float] | None = None
    dataset_split_name: str | None = None
    data_handlers: list[dict] = field(default_factory=list)
    steps: list[HandlerStep] = field(default_factory=list)


@dataclass
class DataProcessorConfig:
    type: str = "default"
    sampling_stopping_strategy: Literal["all_exhausted", "first_exhausted"] = "all_exhausted"
    seed: int = 42
    streaming: bool = False
    chat_template: str | None = None
    chat_template_path: str | None = None
    chat_template_base64: str | None = None
    odm: dict[str, Any] | None = None  # type: odm only (tuning/data/odm.py)


@dataclass
class DataConfig:
    path: str
    dataprocessor: DataProcessorConfig
    datasets: list[DatasetConfig]
    chat_template: str | None = None
    odm: OdmConfig | None = None  # online data mixing (dataprocessor type odm)


def load_data_config(path: str) -> DataConfig:
    """Read and validate a data config; cached per file version so warnings are printed once."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data config {path} does not exist; pass an existing YAML or JSON file")
    stat = file.stat()
    return _load_cached(str(file.resolve()), stat.st_mtime_ns, stat.st_size, path)


@lru_cache(maxsize=8)
def _load_cached(resolved: str, _mtime: int, _size: int, shown: str) -> DataConfig:
    where = f"data config {shown}"
    raw = read_mapping_file(resolved, "data config", shown)
    _check_keys(raw, ["dataprocessor", "datasets"], where)
    proc_raw = raw.get("dataprocessor") or {}
    proc = _build(DataProcessorConfig, proc_raw, f"{where}: dataprocessor")
    if not 0 <= proc.seed <= SEED_MAX:  # the range --seed has (numpy's)
        raise UserError(
            f"{where}: dataprocessor seed {proc.seed} is out of range; use a whole number in [0, {SEED_MAX}]"
        )
    items = raw.get("datasets")
    if not isinstance(items, list) or not items:
        raise UserError(f"{where}: 'datasets' must be a non-empty list of datasets")
    config = DataConfig(shown, proc, [_dataset(d, f"{where}: datasets[{i}]") for i, d in enumerate(items)])
    config.chat_template = _chat_template(proc, Path(resolved).parent, where)
    config.odm = _odm(config, where)
    _check_mixing(config, where)
    return config


def _check_keys(mapping: dict, valid: list[str], where: str) -> None:
    for key in mapping:
        if key not in valid:
            raise UserError(
                f"{where}: unknown key '{key}'{did_you_mean(str(key), valid)}; valid keys: {', '.join(valid)}"
            )


def _build(cls: type, mapping: Any, where: str) -> Any:
    """A schema dataclass from a mapping: unknown keys, missing required keys and wrong types rejected."""
    if not isinstance(mapping, dict):
        raise UserError(f"{where} must be a mapping, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    schema = [f for f in fields(cls) if f.name not in ("steps", "path")]
    _check_keys(mapping, [f.name for f in schema], where)
    for f in schema:
        if f.name not in mapping and f.default is MISSING and f.default_factory is MISSING:
            raise UserError(f"{where}: key '{f.name}' is required")
        if f.name in mapping and not type_matches(hints[f.name], mapping[f.name]):
            raise UserError(
                f"{where}: '{f.name}' must be {str(hints[f.name]).replace('typing.', '')}, got {mapping[f.name]!r:.60}"
            )
    return cls(**mapping)


def _dataset(raw: Any, where: str) -> DatasetConfig:
    if isinstance(raw, dict) and "name" in raw:
        where = f"{where} ({raw['name']})"
    ds = _build(DatasetConfig, raw, where)
    if ds.sampling is not None and not 0 <= ds.sampling <= 1:
        raise UserError(f"{where}: sampling ratio {ds.sampling} is out of range; use a number in [0, 1]")
    if ds.split is not None:
        _check_keys(ds.split, ["train", "validation"], f"{where}: split")
        if any(not 0 <= v <= 1 for v in ds.split.values()) or sum(ds.split.values()) > 1 + 1e-9:
            raise UserError(
                f"{where}: split {ds.split} is out of range; train and validation are fractions in [0, 1] "
                "summing to at most 1"
            )
    ds.steps = [_step(h, f"{where}: data_handlers[{i}]") for i, h in enumerate(ds.data_handlers)]
    return ds


def _step(raw: Any, where: str) -> HandlerStep:
    step = _build(HandlerStep, raw, where)
    handler = get_handler(step.name, where)
    where = f"{where} ({step.name})"
    if not isinstance(step.arguments, dict):
        raise UserError(f"{where}: 'arguments' must be a mapping")
    args = dict(step.arguments)
    fn_kwargs = dict(args.pop("fn_kwargs", None) or {})
    batched = args.pop("batched", None)
    remove = args.pop("remove_columns", None)
    allowed = {"map": MAP_KEYWORDS, "filter": FILTER_KEYWORDS}.get(handler.kind, set())
    for key, value in args.items():
        if key in handler.params or key in handler.aliases or key in handler.ignored:
            fn_kwargs[key] = value  # column handlers take their arguments directly, as in the reference tool
        elif key in allowed:
            step.map_kwargs[key] = value
        else:
            valid = sorted({*handler.params, *allowed, "fn_kwargs", "batched", "remove_columns"})
            raise UserError(f"{where}: unknown argument '{key}'{did_you_mean(key, valid)}")
    step.kwargs = resolve_kwargs(handler, fn_kwargs, where)
    if batched is not None and bool(batched) != handler.batched:
        logger.warning(
            "%s: 'batched: %s' is ignored: this handler works on %s (same result)",
            where,
            batched,
            "batches" if handler.batched else "single rows",
        )
    if remove is not None:
        if remove != "all" and not type_matches(list[str], remove):
            raise UserError(
                f"{where}: remove_columns must be 'all' or a list of column names, got {remove!r:.60}"
            )
        if handler.kind != "map":
            logger.warning("%s: remove_columns is ignored: only map handlers remove columns", where)
            remove = None
    step.handler, step.remove_columns = handler, remove
    return step


def _chat_template(proc: DataProcessorConfig, base: Path, where: str) -> str | None:
    given = [k for k in ("chat_template", "chat_template_path", "chat_template_base64") if getattr(proc, k)]
    if len(given) > 1:
        raise UserError(f"{where}: dataprocessor sets {' and '.join(given)}; set only one")
    if proc.chat_template_path:
        path = local_path(proc.chat_template_path, base)
        if not path.is_file():
            raise UserError(f"{where}: chat_template_path {proc.chat_template_path} does not exist")
        return path.read_text(encoding="utf-8")
    if proc.chat_template_base64:
        try:
            return base64.b64decode(proc.chat_template_base64, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise UserError(
                f"{where}: chat_template_base64 is not base64 of UTF-8 text; encode the template with "
                "`base64 -w0 template.jinja`"
            ) from None
    return proc.chat_template


def _odm(config: DataConfig, where: str) -> OdmConfig | None:
    proc = config.dataprocessor
    if proc.type not in ("default", "odm"):
        raise UserError(f"{where}: dataprocessor type '{proc.type}' is unknown; use default or odm")
    if proc.type == "default":
        if proc.odm is not None:
            raise UserError(f"{where}: dataprocessor sets 'odm' but its type is default; set type: odm")
        return None
    odm = _build(OdmConfig, proc.odm or {}, f"{where}: dataprocessor.odm")
    check_odm(odm, config.datasets, f"{where}: dataprocessor.odm")
    if proc.streaming:
        raise UserError(
            f"{where}: online data mixing needs row counts, which streaming datasets lack; use streaming: false"
        )
    return odm


def _check_mixing(config: DataConfig, where: str) -> None:
    if config.dataprocessor.streaming and any(d.split for d in config.datasets):
        raise UserError(
            f"{where}: split needs row counts, which streaming datasets lack; use streaming: false"
        )
    sampled = [d for d in config.datasets if d.sampling is not None]
    if not sampled:
        return
    for d in config.datasets:
        contributes = d.split is None or d.split.get("train", 0) > 0
        if d.sampling is None and contributes:
            raise UserError(
                f"{where}: dataset '{d.name}' has no sampling ratio while others do; give every dataset "
                "that contributes training rows a sampling ratio"
            )
    if sum(d.sampling or 0 for d in sampled) <= 0:
        raise UserError(f"{where}: the sampling ratios sum to 0; at least one must be positive")


def local_path(path: str, base: Path) -> Path:
    """Relative paths are tried from the working directory, then from the data config's folder."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (base / p).exists():
        return p
    return base / p
