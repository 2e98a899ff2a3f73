"""The last step every dataset goes through, from a data file or a data config: rows → formatted text →
``input_ids`` + ``labels``; rows with nothing to train are dropped and counted."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from tuning.config import DataArgs
from tuning.data import audit, chat, formats, vision
from tuning.data.audit import AuditSource
from tuning.data.data_config import load_data_config
from tuning.data.loading import load_data
from tuning.data.tokenize import IGNORE_INDEX, NO_TEMPLATE, OK, tokenize_batch
from tuning.errors import UserError, excerpt

logger = logging.getLogger(__name__)


@dataclass
class DataStats:
    """A source's counts. Rows are what the data holds, samples what training sees: a chat row can become
    several samples (its template rewrites earlier turns), and a row or sample can be dropped."""

    rows: int = 0  # rows the last step read (conversations, for chat)
    kept: int = 0  # samples kept (they carry at least one trained token)
    rows_kept: int = 0  # rows with at least one sample kept
    samples: int = 0  # samples made, kept or dropped
    rows_read: int = 0  # rows loaded, before a data config's handlers (0: same as rows)
    trained_tokens: int = 0
    total_tokens: int = 0
    truncated: int = 0  # kept samples cut at max_seq_length
    trained_lost: int = 0  # trained tokens cut off by truncation (dropped samples' too)
    duplicate_samples: int = 0  # kept samples equal (ids and labels) to an earlier one
    empty_trained_text: int = 0  # kept samples whose trained text is empty or whitespace
    dropped: dict[str, int] = field(default_factory=dict)  # samples, by reason
    # chat rows whose template rewrites earlier turns become several samples (docs/data.md)
    conversations_split: int = 0
    split_samples: int = 0
    conversations_over_budget: int = 0
    turns_over_budget: int = 0
    token_roles: dict[str, int] = field(default_factory=dict)  # chat: tokens by role and turn position
    # per kept sample (the audit's length quantiles and duplicates), and a few samples for its page
    lengths: Any = field(default=None, repr=False, compare=False)
    hashes: Any = field(default=None, repr=False, compare=False)
    examples: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)

    def sample_counts(self) -> str:
        """``N rows kept of M`` or, when rows became several samples, ``S samples from N of M rows kept
        (...)``: rows and samples are counted apart."""
        if not self.conversations_split:
            return f"{self.rows_kept} rows kept of {self.rows}"
        return (
            f"{self.kept} samples from {self.rows_kept} of {self.rows} rows kept ({self.conversations_split} "
            f"conversations split into {self.split_samples} samples)"
        )


@dataclass
class PreparedData:
    train: datasets.Dataset
    validation: datasets.Dataset | None
    data_format: str
    stats: DataStats
    # every source the audit reports (a data config's datasets, or the training and validation files)
    sources: list[AuditSource] = field(default_factory=list)
    audit: dict[str, Any] | None = None
    online_mixing: Any = None  # a data config of type odm: its MixingPlan (tuning/data/odm.py)


def total_stats(stats: list[DataStats]) -> DataStats:
    """The sum of several sources' counts (their per-sample figures concatenated: duplicates across
    sources count in the total)."""
    total = DataStats()
    for counter in dataclasses.fields(DataStats):
        if counter.type in ("int", int):
            setattr(total, counter.name, sum(getattr(s, counter.name) for s in stats))
        elif str(counter.type).startswith("dict"):
            merged: dict[str, int] = {}
            for s in stats:
                for key, count in getattr(s, counter.name).items():
                    merged[key] = merged.get(key, 0) + count
            setattr(total, counter.name, merged)
    lengths = [s.lengths for s in stats if s.lengths is not None]
    hashes = [s.hashes for s in stats if s.hashes is not None]
    total.lengths = np.concatenate(lengths) if lengths else None
    total.hashes = np.concatenate(hashes) if hashes else None
    total.duplicate_samples = audit.duplicates(total.hashes) if total.hashes is not None else 0
    return total


@dataclass(frozen=True)
class EncodingContext:
    """What every dataset of a job is encoded with, built once per job by :func:`encoding_context` and
    passed down whole: the data flags, the tokenizer, the context length, the chat settings (the model's
    stop tokens included), the chat template (resolved once) and an image-text model's processor."""

    args: DataArgs
    tokenizer: Any
    max_len: int
    settings: chat.ChatSettings
    processor: Any = None  # None for a text model
    chat_template: str | None = None  # the job's (chat.job_chat_template); None: the tokenizer's own

    def conversations(self, batch: dict[str, list], fmt: str) -> list[chat.Conversation] | None:
        """A batch's rows as conversations when the chat path encodes them (:func:`chat.conversations_of_batch`)."""
        templated = bool(self.chat_template or getattr(self.tokenizer, "chat_template", None))
        return chat.conversations_of_batch(batch, fmt, self.args, self.settings, templated)


def encoding_context(
    args: DataArgs,
    tokenizer: Any,
    max_len: int,
    stop_token_ids: Sequence[int],
    processor: Any = None,
    *,
    keep_sample_info: bool = False,
) -> EncodingContext:
    """The job's :class:`EncodingContext`. ``stop_token_ids`` (the model's generation config and the
    tokenizer's EOS) has no default: chat turns are trained through the first of them, and a job with
    nothing to end a turn is told so here, once."""
    if not stop_token_ids and tokenizer is not None and not tokenizer.eos_token:
        logger.warning(
            "no stop token: neither the model's generation config nor the tokenizer names one, so chat "
            "turns are trained through the whole of each turn's rendering"
        )
    settings = chat.settings_from_args(args, stop_token_ids, keep_sample_info=keep_sample_info)
    config = load_data_config(args.data_config_path) if args.data_config_path else None
    template = chat.job_chat_template(args, config.chat_template if config else None)
    return EncodingContext(args, tokenizer, max_len, settings, processor, template)


def carry_chat_template(ctx: EncodingContext) -> None:
    """The job's chat template onto its tokenizer and processor, the one place it reaches them: the saved
    tokenizer, and a server reading it, render prompts as the model was trained."""
    if ctx.chat_template:
        ctx.tokenizer.chat_template = ctx.chat_template
        if ctx.processor is not None:
            ctx.processor.chat_template = ctx.chat_template


def prepare_path(path: str, ctx: EncodingContext) -> tuple[datasets.Dataset, str, DataStats]:
    """Load one data path, pick its format by the rule, tokenize: (dataset, format, counts). With an
    image-text model's processor, chat rows and their images take the image-text path."""
    raw = load_data(path)
    fmt = formats.resolve_format(ctx.args, raw.column_names)
    local = Path(path).expanduser().resolve()  # references stay valid from any folder (shards, workers)
    base_dir = str(local if local.is_dir() else local.parent)  # relative image paths start here
    vision_data = (
        vision.VisionData(ctx.processor, ctx.args.dataset_image_field, base_dir) if ctx.processor else None
    )
    ds, stats = prepare(raw, fmt, ctx, name=path, vision_data=vision_data)
    return ds, fmt, stats


def prepare(
    raw: datasets.Dataset,
    fmt: str,
    ctx: EncodingContext,
    *,
    name: str,
    vision_data: vision.VisionData | None = None,
) -> tuple[datasets.Dataset, DataStats]:
    """Tokenize one dataset; drop and count rows that would train on nothing."""
    args = ctx.args
    images = vision.image_column_of(args.dataset_image_field, raw.column_names)
    if images and vision_data is None:
        raise UserError(
            f"{name} has an image column '{images}', and the model takes no images; use an image-text model "
            "(AutoModelForImageTextToText: LLaVA, Qwen2.5-VL, ...) or drop the column (docs/vision.md)"
        )
    if fmt == "pretokenized" and images and images != vision.IMAGES:
        raise UserError(
            f"{name}: tokenized image-text rows keep their image references in a column named "
            f"'{vision.IMAGES}'; rename column '{images}'"
        )
    if vision_data is not None and fmt == "chat":
        if images and isinstance(raw.features.get(images), (datasets.Image, datasets.Sequence, list)):
            raw = _undecoded_images(raw, images)
        vision_data = replace(vision_data, image_column=images)
        ctx = replace(ctx, settings=vision.vision_settings(ctx.settings, ctx.tokenizer))
    else:
        vision_data = None
    fn = partial(process_batch, fmt=fmt, ctx=ctx, vision_data=vision_data, name=name)
    ds = raw.map(
        fn,
        batched=True,
        with_indices=vision_data is not None,  # image errors name their row
        remove_columns=raw.column_names,
        desc=f"tokenizing {name}",
    )
    # the mapped table, before any filter: one read of its counters
    stats = count(ds, ctx.tokenizer, examples=args.audit_samples)
    if stats.kept == 0:
        raise UserError(_nothing_to_train_message(raw, fmt, args, Counter(stats.dropped)))
    unit = "rows" if stats.samples == stats.rows else "samples"  # a chat row can become several samples
    for reason, n in stats.dropped.items():
        logger.warning("%s: dropped %d of %d %s (%s)", name, n, stats.samples, unit, reason.replace("_", " "))
    _log_splits(stats, name)
    if stats.dropped:
        ds = ds.filter(lambda s: s == OK, input_columns="status")
    if stats.truncated:
        logger.warning(
            "%s: %d samples were longer than max_seq_length=%d and were truncated (no EOS trained for them; "
            "%d trained tokens cut)",
            name,
            stats.truncated,
            ctx.max_len,
            stats.trained_lost,
        )
    drop = [c for c in audit.COLUMNS if c in ds.column_names]
    if chat.SAMPLE_INFO in ds.column_names and not ctx.settings.keep_sample_info:
        drop.append(chat.SAMPLE_INFO)
    return ds.remove_columns(drop), stats


def count(
    ds: datasets.Dataset, tokenizer: Any = None, batch_rows: int = 8192, examples: int = audit.EXAMPLES
) -> DataStats:
    """A mapped dataset's counts and the audit's per-sample figures, read batch by batch from its table
    (memory bounded)."""
    counter = audit.SourceCounter(tokenizer, examples=examples)
    for batch in ds.data.to_batches(max_chunksize=batch_rows):
        counter.update(batch)
    stats = DataStats(dropped=dict(counter.status), token_roles=dict(counter.roles))
    for key, value in counter.ints.items():
        setattr(stats, key, value)
    stats.lengths, stats.hashes = counter.lengths_array(), counter.hashes_array()
    stats.duplicate_samples = audit.duplicates(stats.hashes)
    stats.examples = counter.samples
    return stats


def _log_splits(stats: DataStats, name: str) -> None:
    if stats.conversations_split:
        logger.info(
            "%s: %d conversations split into %d samples: the chat template renders earlier turns "
            "differently once later turns follow, and each turn is trained in its own context (docs/data.md)",
            name,
            stats.conversations_split,
            stats.split_samples,
        )
    if stats.conversations_over_budget:
        logger.warning(
            "%s: %d conversations exceeded --chat_render_budget; their last %d assistant turns in all are "
            "context only (not trained)",
            name,
            stats.conversations_over_budget,
            stats.turns_over_budget,
        )


def process_batch(
    batch: dict[str, list],
    indices: list[int] | None = None,
    *,
    fmt: str,
    ctx: EncodingContext,
    vision_data: vision.VisionData | None = None,
    name: str = "data",
) -> dict[str, list]:
    """One ``datasets.map`` batch → ``input_ids``, ``labels``, ``status``, ``truncated``, the audit's
    columns (and, for chat rows, :data:`chat.SAMPLE_INFO` and :data:`chat.TOKEN_ROLES`; for image-text
    rows, ``images``): one row per sample, so a chat row can become several."""
    if fmt == "pretokenized":
        return _pretokenized_batch(batch, ctx.max_len)
    conversations = ctx.conversations(batch, fmt)
    if vision_data is not None and conversations is not None:
        column = vision_data.image_column
        where = [f"row {i} of {name}" for i in (indices or range(len(conversations)))]
        for c in conversations:
            c.messages = vision.vision_messages(c.messages)
        refs = [
            vision.image_refs(batch[column][j] if column else None, where[j], vision_data.base_dir)
            for j in range(len(conversations))
        ]
        return vision.encode_vision_conversations(
            conversations, refs, where, vision_data.processor, ctx.settings, ctx.max_len, ctx.chat_template
        )
    if conversations is not None:
        return chat.encode_conversations(
            conversations, ctx.tokenizer, ctx.chat_template, ctx.settings, ctx.max_len
        )[0]
    texts, spans = formats.render_batch(batch, fmt, ctx.args)
    found = [bool(s) for s in spans]
    out = tokenize_batch(ctx.tokenizer, texts, [s or [(0, 0)] for s in spans], max_len=ctx.max_len)
    out["status"] = [st if ok else NO_TEMPLATE for st, ok in zip(out["status"], found, strict=True)]
    return out


def _undecoded_images(raw: datasets.Dataset, column: str) -> datasets.Dataset:
    """``datasets`` ``Image`` columns read as ``{bytes, path}`` instead of decoded: images are decoded
    once, where they are checked, and again by the collator."""
    feature = raw.features[column]
    if isinstance(feature, datasets.Image):
        return raw.cast_column(column, datasets.Image(decode=False))
    inner = feature.feature if isinstance(feature, datasets.Sequence) else feature[0]
    if isinstance(inner, datasets.Image):
        return raw.cast_column(column, datasets.Sequence(datasets.Image(decode=False)))
    return raw


def _pretokenized_batch(batch: dict[str, list], max_len: int) -> dict[str, list]:
    """Tokenized rows (a data config's handlers' output, or a pretokenized file) truncated; the chat
    handler's :data:`chat.SAMPLE_INFO` column is carried along to be counted."""
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
    full = batch["labels"] if "labels" in batch else batch["input_ids"]
    lost = [len(x) - max_len - list(x[max_len:]).count(IGNORE_INDEX) if len(x) > max_len else 0 for x in full]
    out = {"input_ids": ids, "labels": labels, "status": status, "truncated": truncated, "trained_lost": lost}
    for column in (chat.SAMPLE_INFO, chat.TOKEN_ROLES):
        if column in batch:
            out[column] = (
                batch[column] if column == chat.SAMPLE_INFO else [r[:max_len] for r in batch[column]]
            )
    if vision.IMAGES in batch:  # image-text rows written by --do_dataprocessing_only: their references
        out[vision.IMAGES] = batch[vision.IMAGES]
    return out


def _nothing_to_train_message(raw: datasets.Dataset, fmt: str, args: DataArgs, status: Counter) -> str:
    if chat.NO_ASSISTANT in status and len(status) == 1:
        return (
            f"none of the {len(raw)} conversations has an assistant turn to train"
            + (" after the prompt" if fmt == "prompt_completion" else "")
            + "; check the roles (assistant turns are trained, see docs/data.md)"
        )
    if NO_TEMPLATE in status:
        sample = formats.render_batch(raw[:1], fmt, args)[0][0]
        return (
            f"--response_template {args.response_template!r} was not found in any of {len(raw)} rows; "
            f"first row renders as {excerpt(sample)}; pass a marker that occurs in the text"
        )
    return f"no row has a trained token ({dict(status)}); check --max_seq_length and the labels"
