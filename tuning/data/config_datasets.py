"""One dataset of a data config: its files loaded, its handlers run, then the shared last step
(:func:`tuning.data.prepare.prepare`), or its streaming equivalent."""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import datasets

from tuning.config import DataArgs
from tuning.data import audit, chat, formats, loading
from tuning.data.data_config import (
    OWN_KEYWORDS,
    DataConfig,
    DatasetConfig,
    HandlerStep,
    load_data_config,
    local_path,
)
from tuning.data.handlers.registry import expand_rows, input_columns
from tuning.data.prepare import DataStats, EncodingContext, prepare, process_batch
from tuning.data.tokenize import OK
from tuning.data.vision import VisionData
from tuning.errors import UserError, check, did_you_mean, excerpt, first_line

logger = logging.getLogger(__name__)

# what a streamed dataset's map accepts of the keywords a config passes through
STREAMING_KEYWORDS = set(inspect.signature(datasets.IterableDataset.map).parameters) - OWN_KEYWORDS


@dataclass
class ProcessedDataset:
    name: str
    dataset: Any  # datasets.Dataset, or IterableDataset when streaming
    stats: DataStats
    config: DatasetConfig
    data_format: str = "streamed"


def load_dataset_paths(ds: DatasetConfig, config: DataConfig) -> Any:
    """A dataset's ``data_paths`` loaded and concatenated (in order)."""
    base = Path(config.path).resolve().parent
    parts = [
        _load_one(str(local_path(p, base)) if not set("*?[") & set(p) else p, ds, config)
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
    # a builder the user names may read any suffix (e.g. text); otherwise resolve_files checks it
    files = [Path(path)] if ds.builder and Path(path).is_file() else loading.resolve_files(path)
    builder = None if files is None else ds.builder or loading.BUILDERS[files[0].suffix]
    try:
        if files is None:
            return datasets.load_dataset(path, split=ds.dataset_split_name or "train", streaming=streaming)
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", streaming=streaming
        )
    except Exception as e:  # datasets raises many types; the user needs the path and the first line
        where = f"data config {config.path}: dataset '{ds.name}'"
        if files is not None:
            raise UserError(f"{where}: {loading.explain_load_failure(files, builder, e)}") from None
        cause = excerpt(first_line(e))
        raise UserError(
            f"{where}: could not load {path} ({type(e).__name__}: {cause}); check the path and builder"
        ) from None


def apply_step(data: Any, step: HandlerStep, context: dict[str, Any], where: str) -> Any:
    """Run one handler over a dataset; input columns are checked against the data first."""
    handler = step.handler
    check(handler is not None, f"{where}: handler not resolved by load_data_config")
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
        fn = handler.fn
        if handler.expands_rows:  # its rows are not the input's: it repeats the input columns kept
            fn = partial(expand_rows, handler.fn, [c for c in columns if c not in (remove or [])])
            remove = columns
        return data.map(fn, batched=handler.batched, fn_kwargs=kwargs, remove_columns=remove, **extra)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def process_dataset(ds: DatasetConfig, config: DataConfig, ctx: EncodingContext) -> ProcessedDataset:
    """Load one dataset, run its handlers, then tokenize/truncate/drop as the CLI path does (with an
    image-text model's processor, chat rows and their images take the image-text path)."""
    data = load_dataset_paths(ds, config)
    rows_read = len(data) if isinstance(data, datasets.Dataset) else 0
    context = {
        "tokenizer": ctx.tokenizer,
        "chat_template": ctx.chat_template,
        "chat_settings": ctx.settings,
    }
    for i, step in enumerate(ds.steps):
        where = f"data config {config.path}: dataset '{ds.name}': data_handlers[{i}] ({step.name})"
        data = apply_step(data, step, context, where)
    if isinstance(data, datasets.Dataset) and len(data) == 0:
        raise UserError(
            f"data config {config.path}: dataset '{ds.name}' has no rows left after its data handlers; "
            "check their arguments"
        )
    fmt, fmt_args = final_format(column_names(data), _text_columns(data), ctx.args)
    ctx = replace(ctx, args=fmt_args)
    if isinstance(data, datasets.IterableDataset):
        if ctx.processor is not None:
            raise UserError(
                f"data config {config.path}: dataset '{ds.name}' is streamed, and image-text rows are "
                "prepared ahead of training; set streaming: false"
            )
        return ProcessedDataset(ds.name, _finalize_stream(data, fmt, ctx), DataStats(), ds)
    vision_data = None
    if ctx.processor is not None:  # relative image paths: from the folder of the dataset's (first) data file
        first = local_path(ds.data_paths[0], Path(config.path).resolve().parent).resolve()  # as data is found
        base = first if first.is_dir() else first.parent
        vision_data = VisionData(ctx.processor, ctx.args.dataset_image_field, str(base))
    processed, stats = prepare(data, fmt, ctx, name=f"dataset '{ds.name}'", vision_data=vision_data)
    stats.rows_read = rows_read
    return ProcessedDataset(ds.name, processed, stats, ds, fmt)


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


def _finalize_stream(data: Any, fmt: str, ctx: EncodingContext) -> Any:
    def process(batch: dict[str, list]) -> dict[str, list]:
        out = process_batch(batch, fmt=fmt, ctx=ctx)
        for column in (chat.SAMPLE_INFO, *audit.COLUMNS[1:]):  # counts are not computed when streaming
            out.pop(column, None)
        return out

    data = data.map(process, batched=True, remove_columns=column_names(data))
    return data.filter(lambda s: s == OK, input_columns="status").remove_columns(["status"])


def process_all(ctx: EncodingContext) -> tuple[DataConfig, list[ProcessedDataset]]:
    check(ctx.args.data_config_path, "process_all needs --data_config_path")
    config = load_data_config(ctx.args.data_config_path)
    return config, [process_dataset(d, config, ctx) for d in config.datasets]
