"""Data configs (``--data_config_path``): several datasets, each a chain of named handlers, mixed.

The file is read and validated whole before any data is touched: unknown keys, handlers and handler
arguments are errors naming the file, the dataset and the key, with the closest valid name. Configs
written for fms-hf-tuning run unchanged (its old argument names are accepted with a warning).

After its handlers, a dataset goes through the same last step as ``--training_data_path`` data
(:func:`tuning.data.pipeline.prepare`): tokenized rows are truncated to ``max_seq_length`` and rows with
nothing to train are dropped and counted; text rows are formatted and masked by the CLI's rules.
"""

from __future__ import annotations

import base64
import binascii
import copy
import inspect
import logging
import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import datasets

from tuning.config.args import DataArgs
from tuning.config.parser import read_mapping_file
from tuning.data import formats, loading
from tuning.data.handlers import Handler, get_handler, resolve_kwargs
from tuning.data.handlers.registry import did_you_mean, input_columns, type_matches
from tuning.data.pipeline import DataStats, PreparedData, prepare, process_batch
from tuning.data.tokenize import OK
from tuning.errors import UserError

logger = logging.getLogger(__name__)

# ``datasets``' own map/filter keywords a config may pass through (num_proc, batch_size, ...).
_OWN = {"self", "function", "fn_kwargs", "batched", "remove_columns", "with_indices", "with_rank"}
MAP_KEYWORDS = set(inspect.signature(datasets.Dataset.map).parameters) - _OWN
FILTER_KEYWORDS = set(inspect.signature(datasets.Dataset.filter).parameters) - _OWN
STREAMING_KEYWORDS = set(inspect.signature(datasets.IterableDataset.map).parameters) - _OWN


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


@dataclass
class DataConfig:
    path: str
    dataprocessor: DataProcessorConfig
    datasets: list[DatasetConfig]
    chat_template: str | None = None


@dataclass
class ProcessedDataset:
    name: str
    dataset: Any  # datasets.Dataset, or IterableDataset when streaming
    stats: DataStats
    config: DatasetConfig


# --------------------------------------------------------------------------------------------- schema


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
    if isinstance(proc_raw, dict) and proc_raw.get("type", "default") != "default":
        raise UserError(
            f"{where}: dataprocessor type '{proc_raw['type']}' is not supported (online data mixing is "
            "not implemented); use type: default with per-dataset sampling ratios"
        )
    proc = _build(DataProcessorConfig, proc_raw, f"{where}: dataprocessor")
    items = raw.get("datasets")
    if not isinstance(items, list) or not items:
        raise UserError(f"{where}: 'datasets' must be a non-empty list of datasets")
    config = DataConfig(shown, proc, [_dataset(d, f"{where}: datasets[{i}]") for i, d in enumerate(items)])
    config.chat_template = _chat_template(proc, Path(resolved).parent, where)
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
        path = _local_path(proc.chat_template_path, base)
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


def _local_path(path: str, base: Path) -> Path:
    """Relative paths are tried from the working directory, then from the data config's folder."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (base / p).exists():
        return p
    return base / p


# --------------------------------------------------------------------------------------- processing


def load_dataset_paths(ds: DatasetConfig, config: DataConfig) -> Any:
    """A dataset's ``data_paths`` loaded and concatenated (in order)."""
    base = Path(config.path).resolve().parent
    parts = [
        _load_one(str(_local_path(p, base)) if not set("*?[") & set(p) else p, ds, config)
        for p in ds.data_paths
    ]
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as e:
        raise UserError(
            f"data config {config.path}: dataset '{ds.name}': its data_paths have different columns ({e})"
        ) from None


def _load_one(path: str, ds: DatasetConfig, config: DataConfig) -> Any:
    streaming = config.dataprocessor.streaming
    if not streaming and ds.builder is None and ds.dataset_split_name in (None, "train"):
        return loading.load_data(path)  # the CLI's loader, with its line-numbered error messages
    files = [Path(path)] if Path(path).is_file() else loading.resolve_files(path)
    try:
        if files is None:
            return datasets.load_dataset(path, split=ds.dataset_split_name or "train", streaming=streaming)
        builder = ds.builder or loading.BUILDERS[files[0].suffix]
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", streaming=streaming
        )
    except Exception as e:  # datasets raises many types; the user needs the path and the first line
        raise UserError(
            f"data config {config.path}: dataset '{ds.name}': could not load {path} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the path and builder"
        ) from None


def apply_step(data: Any, step: HandlerStep, context: dict[str, Any], where: str) -> Any:
    """Run one handler over a dataset; input columns are checked against the data first."""
    handler = step.handler
    assert handler is not None, "validated by load_data_config"
    columns = column_names(data)
    for col in input_columns(handler, step.kwargs):
        if col not in columns:
            raise UserError(
                f"{where}: column '{col}' is not in the data{did_you_mean(col, columns)}; columns: {columns}"
            )
    kwargs = {**step.kwargs, **{k: context[k] for k in handler.context}}
    if handler.kind == "dataset":
        return handler.fn(data, **kwargs)
    extra = dict(step.map_kwargs)
    if isinstance(data, datasets.IterableDataset):
        extra = {k: v for k, v in extra.items() if k in STREAMING_KEYWORDS}
    elif handler.kind == "map":
        extra.setdefault("desc", step.name)
    try:
        if handler.kind == "filter":
            before = len(data) if isinstance(data, datasets.Dataset) else None
            data = data.filter(handler.fn, batched=handler.batched, fn_kwargs=kwargs, **extra)
            if before is not None and len(data) < before:
                logger.info("%s: skipped %d of %d rows", where, before - len(data), before)
            return data
        remove = columns if step.remove_columns == "all" else step.remove_columns
        return data.map(handler.fn, batched=handler.batched, fn_kwargs=kwargs, remove_columns=remove, **extra)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def process_dataset(
    ds: DatasetConfig, config: DataConfig, args: DataArgs, tokenizer: Any, max_len: int
) -> ProcessedDataset:
    """Load one dataset, run its handlers, then tokenize/truncate/drop as the CLI path does."""
    data = load_dataset_paths(ds, config)
    context = {"tokenizer": tokenizer, "chat_template": config.chat_template}
    for i, step in enumerate(ds.steps):
        where = f"data config {config.path}: dataset '{ds.name}': data_handlers[{i}] ({step.name})"
        data = apply_step(data, step, context, where)
    if isinstance(data, datasets.Dataset) and len(data) == 0:
        raise UserError(
            f"data config {config.path}: dataset '{ds.name}' has no rows left after its data handlers; "
            "check their arguments"
        )
    fmt, fmt_args = final_format(column_names(data), _text_columns(data), args)
    if isinstance(data, datasets.IterableDataset):
        return ProcessedDataset(
            ds.name, _finalize_stream(data, fmt, fmt_args, tokenizer, max_len), DataStats(), ds
        )
    processed, stats = prepare(data, fmt, fmt_args, tokenizer, max_len, name=f"dataset '{ds.name}'")
    return ProcessedDataset(ds.name, processed, stats, ds)


def column_names(data: Any) -> list[str]:
    if data.column_names is not None:
        return list(data.column_names)
    first = next(iter(data), None)  # a streamed dataset knows its columns only once a row is read
    return list(first) if first else []


def _text_columns(data: Any) -> list[str]:
    if isinstance(data, datasets.Dataset):
        return [
            c for c, f in data.features.items() if getattr(f, "dtype", None) in ("string", "large_string")
        ]
    first = next(iter(data), None) or {}
    return [c for c, v in first.items() if isinstance(v, str)]


def final_format(columns: list[str], text_columns: list[str], args: DataArgs) -> tuple[str, DataArgs]:
    """How a dataset's rows become training samples after its handlers: tokenized rows are used as they
    are; a single text column (what a template handler writes) is the training text; otherwise the
    CLI's format rule (``--dataset_text_field``, ``--response_template``, ...) applies."""
    if "input_ids" in columns:
        return "pretokenized", args
    flags = args.dataset_text_field or args.data_formatter_template or args.dataset_conversation_field
    if args.data_format == "auto" and not flags and len(columns) == 1 and columns == text_columns:
        args = copy.copy(args)
        args.dataset_text_field = columns[0]
    return formats.resolve_format(args, columns), args


def _finalize_stream(data: Any, fmt: str, args: DataArgs, tokenizer: Any, max_len: int) -> Any:
    def process(batch: dict[str, list]) -> dict[str, list]:
        return process_batch(batch, fmt=fmt, args=args, tokenizer=tokenizer, max_len=max_len)

    data = data.map(process, batched=True, remove_columns=column_names(data))
    return data.filter(lambda s: s == OK, input_columns="status").remove_columns(["status", "truncated"])


def split_dataset(part: ProcessedDataset, seed: int) -> tuple[Any, Any]:
    """(train, validation) parts of one processed dataset by its ``split`` fractions (seeded shuffle);
    rows in neither fraction are left out."""
    split = part.config.split
    if not split:
        return part.dataset, None
    n = len(part.dataset)
    shuffled = part.dataset.shuffle(seed=seed)
    n_val = round(split.get("validation", 0) * n)
    n_train = min(round(split.get("train", 0) * n), n - n_val)
    validation = shuffled.select(range(n_val)) if n_val else None
    train = shuffled.select(range(n_val, n_val + n_train)) if n_train else None
    return train, validation


def mix(parts: list[tuple[Any, float | None]], config: DataConfig) -> Any:
    """Interleave train parts with their sampling ratios (seeded) or, without ratios, concatenate."""
    proc = config.dataprocessor
    parts = [(d, r) for d, r in parts if r is None or r > 0]
    aligned = align_features([d for d, _ in parts])
    parts = [(d, r) for d, (_, r) in zip(aligned, parts, strict=True)]
    if len(parts) == 1:
        return parts[0][0]
    if all(r is None for _, r in parts):
        return datasets.concatenate_datasets([d for d, _ in parts])
    total = sum(r for _, r in parts if r is not None)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        logger.warning("data config %s: sampling ratios sum to %g; normalised to 1", config.path, total)
    return datasets.interleave_datasets(
        [d for d, _ in parts],
        probabilities=[(r or 0) / total for _, r in parts],
        seed=proc.seed,
        stopping_strategy=proc.sampling_stopping_strategy,
    )


def align_features(parts: list[Any]) -> list[Any]:
    """Cast every part to the first one's features: ``datasets`` refuses to mix ``int32`` token lists
    from one file with ``int64`` ones from another, though they mean the same."""
    first = parts[0].features
    if first is None:
        return parts
    return [p if p.features is None or p.features == first else p.cast(first) for p in parts]


def process_all(args: DataArgs, tokenizer: Any, max_len: int) -> tuple[DataConfig, list[ProcessedDataset]]:
    assert args.data_config_path, "validated by the config stage"
    config = load_data_config(args.data_config_path)
    if config.chat_template:
        # the saved tokenizer must carry the template the model was trained with
        tokenizer.chat_template = config.chat_template
    return config, [process_dataset(d, config, args, tokenizer, max_len) for d in config.datasets]


def build_from_data_config(args: DataArgs, tokenizer: Any, max_len: int) -> PreparedData:
    """The data stage for ``--data_config_path``: every dataset processed, split, mixed."""
    config, processed = process_all(args, tokenizer, max_len)
    train_parts, validation_parts = [], []
    for part in processed:
        train, validation = split_dataset(part, config.dataprocessor.seed)
        if train is not None and (not isinstance(train, datasets.Dataset) or len(train)):
            train_parts.append((train, part.config.sampling))
        if validation is not None:
            validation_parts.append(validation)
    if not train_parts or all(r == 0 for _, r in train_parts):
        raise UserError(
            f"data config {config.path}: no training rows are left after split; give at least one "
            "dataset a positive train fraction (or no split)"
        )
    validation = datasets.concatenate_datasets(align_features(validation_parts)) if validation_parts else None
    train = mix(train_parts, config)
    return PreparedData(train, validation, "data_config", _total_stats(processed))


def _total_stats(parts: list[ProcessedDataset]) -> DataStats:
    total = DataStats()
    for p in parts:
        for name in ("rows", "kept", "trained_tokens", "total_tokens", "truncated"):
            setattr(total, name, getattr(total, name) + getattr(p.stats, name))
        for reason, count in p.stats.dropped.items():
            total.dropped[reason] = total.dropped.get(reason, 0) + count
    return total


def write_processed(data: PreparedData, args: DataArgs, output_dir: str) -> dict[str, Any]:
    """``--do_dataprocessing_only``: the processed sets as parquet shards under ``output_dir/train`` and
    ``output_dir/validation``; ``--training_data_path output_dir/train`` trains from them."""
    if not isinstance(data.train, datasets.Dataset):
        raise UserError(
            "--do_dataprocessing_only writes row counts and shards; set streaming: false in the data config"
        )
    written: dict[str, Any] = {"rows": {}}
    for name, ds, shards in (
        ("train", data.train, args.num_train_dataset_shards),
        ("validation", data.validation, args.num_eval_dataset_shards),
    ):
        if ds is None:
            continue
        folder = Path(output_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        shards = max(1, min(shards, len(ds)))
        for i in range(shards):
            ds.shard(shards, i, contiguous=True).to_parquet(
                str(folder / f"{name}-{i:05d}-of-{shards:05d}.parquet")
            )
        written["rows"][name] = len(ds)
        logger.info("wrote %d %s rows as %d parquet shards to %s", len(ds), name, shards, folder)
    return written
