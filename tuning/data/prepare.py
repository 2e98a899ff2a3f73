"""The last step every dataset goes through, from a data file or a data config: rows → formatted text →
``input_ids`` + ``labels``; rows with nothing to train are dropped and counted."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import datasets

from tuning.config import DataArgs
from tuning.data import formats
from tuning.data.loading import load_data
from tuning.data.tokenize import IGNORE_INDEX, NO_TEMPLATE, OK, tokenize_batch
from tuning.errors import UserError, excerpt

logger = logging.getLogger(__name__)


@dataclass
class DataStats:
    rows: int = 0
    kept: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class PreparedData:
    train: datasets.Dataset
    validation: datasets.Dataset | None
    data_format: str
    stats: DataStats


def prepare_path(
    path: str, args: DataArgs, tokenizer: Any, max_len: int
) -> tuple[datasets.Dataset, str, DataStats]:
    """Load one data path, pick its format by the rule, tokenize: (dataset, format, counts)."""
    raw = load_data(path)
    fmt = formats.resolve_format(args, raw.column_names)
    ds, stats = prepare(raw, fmt, args, tokenizer, max_len, name=path)
    return ds, fmt, stats


def prepare(
    raw: datasets.Dataset, fmt: str, args: DataArgs, tokenizer: Any, max_len: int, *, name: str
) -> tuple[datasets.Dataset, DataStats]:
    """Tokenize one dataset; drop and count rows that would train on nothing."""
    fn = partial(process_batch, fmt=fmt, args=args, tokenizer=tokenizer, max_len=max_len)
    ds = raw.map(fn, batched=True, remove_columns=raw.column_names, desc=f"tokenizing {name}")
    status = Counter(ds["status"])
    stats = DataStats(rows=len(raw), kept=status.pop(OK, 0), dropped=dict(status))
    if stats.kept == 0:
        raise UserError(_nothing_to_train_message(raw, fmt, args, tokenizer, status))
    for reason, count in status.items():
        logger.warning("%s: dropped %d of %d rows (%s)", name, count, len(raw), reason.replace("_", " "))
    if status:
        ds = ds.filter(lambda s: s == OK, input_columns="status")
    stats.truncated = sum(ds["truncated"])
    if stats.truncated:
        logger.warning(
            "%s: %d rows were longer than max_seq_length=%d and were truncated (no EOS trained for them)",
            name,
            stats.truncated,
            max_len,
        )
    ds = ds.remove_columns(["status", "truncated"])
    for labels in ds.select_columns("labels").iter(batch_size=1000):
        for row in labels["labels"]:
            stats.trained_tokens += sum(1 for t in row if t != IGNORE_INDEX)
            stats.total_tokens += len(row)
    return ds, stats


def process_batch(
    batch: dict[str, list], *, fmt: str, args: DataArgs, tokenizer: Any, max_len: int
) -> dict[str, list]:
    """One ``datasets.map`` batch → ``input_ids``, ``labels``, ``status``, ``truncated``."""
    if fmt == "pretokenized":
        return _pretokenized_batch(batch, max_len)
    texts, spans = render_batch(batch, fmt, args, tokenizer)
    found = [bool(s) for s in spans]
    out = tokenize_batch(
        tokenizer,
        texts,
        [s or [(0, 0)] for s in spans],
        max_len=max_len,
        add_special_tokens=fmt != "chat",  # chat templates write their own BOS
        append_eos=fmt != "chat",  # chat templates end assistant turns with their own end token
    )
    out["status"] = [st if ok else NO_TEMPLATE for st, ok in zip(out["status"], found, strict=True)]
    return out


def render_batch(
    batch: dict[str, list], fmt: str, args: DataArgs, tokenizer: Any
) -> tuple[list[str], list[list[formats.Span]]]:
    """Rows of one batch → texts and their trained spans (an empty list: marker not found)."""
    n = len(next(iter(batch.values())))
    rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    if fmt == "input_output":
        pairs = [formats.combine_input_output(r["input"], r["output"]) for r in rows]
        return [t for t, _ in pairs], [[s] for _, s in pairs]
    if fmt == "chat":
        column = args.dataset_conversation_field or formats.DEFAULT_CONVERSATION_FIELD
        chats = [formats.chat_text_and_spans(r[column], tokenizer, args.chat_template) for r in rows]
        return [t for t, _ in chats], [s for _, s in chats]
    if fmt == "template":
        template = formats.RowTemplate(args.data_formatter_template or "")
        texts = [template.render(r) for r in rows]
    else:
        texts = [_text(r, args.dataset_text_field) for r in rows]
    spans = [formats.response_spans(t, args.response_template, args.instruction_template) for t in texts]
    return texts, spans


def _text(row: dict[str, Any], column: str | None) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise UserError(f"column '{column}' must hold text, found {type(value).__name__}: {excerpt(value)}")
    return value


def _pretokenized_batch(batch: dict[str, list], max_len: int) -> dict[str, list]:
    ids = [list(x)[:max_len] for x in batch["input_ids"]]
    if "labels" in batch:
        labels = [list(x)[:max_len] for x in batch["labels"]]
        for i, (a, b) in enumerate(zip(ids, labels, strict=True)):
            if len(a) != len(b):
                raise UserError(f"pretokenized row {i}: labels and input_ids differ in length")
    else:
        labels = [list(x) for x in ids]
    status = [OK if any(t != IGNORE_INDEX for t in lab) else "no_trained_token" for lab in labels]
    truncated = [len(x) > max_len for x in batch["input_ids"]]
    return {"input_ids": ids, "labels": labels, "status": status, "truncated": truncated}


def _nothing_to_train_message(
    raw: datasets.Dataset, fmt: str, args: DataArgs, tokenizer: Any, status: Counter
) -> str:
    if NO_TEMPLATE in status:
        sample = render_batch(raw[:1], fmt, args, tokenizer)[0][0]
        return (
            f"--response_template {args.response_template!r} was not found in any of {len(raw)} rows; "
            f"first row renders as {excerpt(sample)}; pass a marker that occurs in the text"
        )
    return f"no row has a trained token ({dict(status)}); check --max_seq_length and the labels"
