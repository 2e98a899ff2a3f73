"""The last step every dataset goes through, from a data file or a data config: rows → formatted text →
``input_ids`` + ``labels``; rows with nothing to train are dropped and counted."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from tuning.config import DataArgs
from tuning.data import chat, formats, vision
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
    # chat rows whose template rewrites earlier turns become several samples (docs/data.md)
    conversations_split: int = 0
    split_samples: int = 0
    conversations_over_budget: int = 0
    turns_over_budget: int = 0

    def sample_counts(self) -> str:
        """``N rows kept of M`` or, when conversations were split, ``N samples from M rows (...)``."""
        if not self.conversations_split:
            return f"{self.kept} rows kept of {self.rows}"
        return (
            f"{self.kept} samples from {self.rows} rows ({self.conversations_split} conversations split "
            f"into {self.split_samples} samples)"
        )


@dataclass
class PreparedData:
    train: datasets.Dataset
    validation: datasets.Dataset | None
    data_format: str
    stats: DataStats


def prepare_path(
    path: str,
    args: DataArgs,
    tokenizer: Any,
    max_len: int,
    settings: chat.ChatSettings | None = None,
    processor: Any = None,
) -> tuple[datasets.Dataset, str, DataStats]:
    """Load one data path, pick its format by the rule, tokenize: (dataset, format, counts). With an
    image-text model's ``processor``, chat rows and their images take the image-text path."""
    raw = load_data(path)
    fmt = formats.resolve_format(args, raw.column_names)
    local = Path(path).expanduser().resolve()  # references stay valid from any folder (shards, workers)
    base_dir = str(local if local.is_dir() else local.parent)  # relative image paths start here
    vision_data = vision.VisionData(processor, args.dataset_image_field, base_dir) if processor else None
    ds, stats = prepare(
        raw, fmt, args, tokenizer, max_len, name=path, settings=settings, vision_data=vision_data
    )
    return ds, fmt, stats


def prepare(
    raw: datasets.Dataset,
    fmt: str,
    args: DataArgs,
    tokenizer: Any,
    max_len: int,
    *,
    name: str,
    settings: chat.ChatSettings | None = None,
    vision_data: vision.VisionData | None = None,
) -> tuple[datasets.Dataset, DataStats]:
    """Tokenize one dataset; drop and count rows that would train on nothing."""
    settings = settings or chat.settings_from_args(args)
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
        settings = vision.vision_settings(settings, tokenizer)
    else:
        vision_data = None
    fn = partial(
        process_batch,
        fmt=fmt,
        args=args,
        tokenizer=tokenizer,
        max_len=max_len,
        settings=settings,
        vision_data=vision_data,
        name=name,
    )
    ds = raw.map(
        fn,
        batched=True,
        with_indices=vision_data is not None,  # image errors name their row
        remove_columns=raw.column_names,
        desc=f"tokenizing {name}",
    )
    status = Counter(ds.data.column("status").to_pylist())  # the mapped table, before any filter
    stats = DataStats(rows=len(raw), kept=status.pop(OK, 0), dropped=dict(status))
    if chat.SAMPLE_INFO in ds.column_names:
        _count_splits(stats, ds[chat.SAMPLE_INFO], name)
    if stats.kept == 0:
        raise UserError(_nothing_to_train_message(raw, fmt, args, tokenizer, status))
    for reason, count in status.items():
        logger.warning("%s: dropped %d of %d rows (%s)", name, count, len(raw), reason.replace("_", " "))
    if status:
        ds = ds.filter(lambda s: s == OK, input_columns="status")
    kept = ds.select_columns(["labels", "truncated"]).with_format("arrow")[:]  # one columnar read
    stats.truncated = pc.sum(kept.column("truncated")).as_py() or 0
    stats.total_tokens, stats.trained_tokens = token_counts(kept.column("labels"))
    if stats.truncated:
        logger.warning(
            "%s: %d rows were longer than max_seq_length=%d and were truncated (no EOS trained for them)",
            name,
            stats.truncated,
            max_len,
        )
    extra = [] if settings.keep_sample_info or chat.SAMPLE_INFO not in ds.column_names else [chat.SAMPLE_INFO]
    return ds.remove_columns(["status", "truncated", *extra]), stats


def token_counts(labels: pa.ChunkedArray) -> tuple[int, int]:
    """(all tokens, trained tokens) of a column of label lists, computed by arrow (no Python loop)."""
    flat = pc.list_flatten(labels)
    total = len(flat)
    return total, total - (pc.sum(pc.equal(flat, IGNORE_INDEX)).as_py() or 0)


def _count_splits(stats: DataStats, info: list[list[int]], name: str) -> None:
    for part, parts, over_budget in info:
        if part == 0 and parts > 1:
            stats.conversations_split += 1
            stats.split_samples += parts
        if over_budget:
            stats.conversations_over_budget += 1
            stats.turns_over_budget += over_budget
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
    args: DataArgs,
    tokenizer: Any,
    max_len: int,
    settings: chat.ChatSettings | None = None,
    vision_data: vision.VisionData | None = None,
    name: str = "data",
) -> dict[str, list]:
    """One ``datasets.map`` batch → ``input_ids``, ``labels``, ``status``, ``truncated`` (and, for chat
    rows, :data:`chat.SAMPLE_INFO`; for image-text rows, ``images``): one row per sample, so a chat row
    can become several."""
    if fmt == "pretokenized":
        return _pretokenized_batch(batch, max_len)
    settings = settings or chat.settings_from_args(args)
    conversations = chat_conversations(batch, fmt, args, tokenizer, settings)
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
            conversations, refs, where, vision_data.processor, settings, max_len
        )
    if conversations is not None:
        return chat.encode_conversations(conversations, tokenizer, args.chat_template, settings, max_len)[0]
    texts, spans = render_batch(batch, fmt, args, tokenizer)
    found = [bool(s) for s in spans]
    out = tokenize_batch(tokenizer, texts, [s or [(0, 0)] for s in spans], max_len=max_len)
    out["status"] = [st if ok else NO_TEMPLATE for st, ok in zip(out["status"], found, strict=True)]
    return out


def chat_conversations(
    batch: dict[str, list], fmt: str, args: DataArgs, tokenizer: Any, settings: chat.ChatSettings
) -> list[chat.Conversation] | None:
    """The batch's rows as conversations when they are chat data, else None: ``messages``/``conversations``
    (ShareGPT included), prompt/completion given as lists of messages (the prompt is context), and alpaca
    rows when there is a chat template (the instruction, then the input, as the user's turn)."""
    messages = fmt == "prompt_completion" and batch["prompt"] and not isinstance(batch["prompt"][0], str)
    chat_alpaca = fmt == "alpaca" and (args.chat_template or getattr(tokenizer, "chat_template", None))
    if not (fmt == "chat" or messages or chat_alpaca):
        return None  # a text format: render_batch reads the rows
    rows = formats.rows_of(batch)
    if fmt == "chat":
        return chat.conversations_from_rows(rows, formats.conversation_column(args, list(batch)), settings)
    if messages:
        out = []
        for r in rows:
            prompt = chat.normalize_messages(r["prompt"], "prompt")
            completion = chat.normalize_messages(r["completion"], "completion")
            out.append(chat.conversation_from_row(r, prompt + completion, settings, len(prompt)))
        return out
    out = []
    for r in rows:  # alpaca with a chat template: the instruction (and input) as the user's turn
        system = [{"role": "system", "content": r["system"]}] if r.get("system") else []
        user = {"role": "user", "content": formats.alpaca_user_message(r)}
        assistant = {"role": "assistant", "content": formats.require_text(r["output"], "output")}
        out.append(chat.conversation_from_row(r, [*system, user, assistant], settings, len(system) + 1))
    return out


def render_batch(
    batch: dict[str, list], fmt: str, args: DataArgs, tokenizer: Any
) -> tuple[list[str], list[list[formats.Span]]]:
    """Rows of one text-format batch → texts and their trained spans (an empty list: marker not found),
    after ``--train_on``: ``last_response`` keeps the last span, ``all`` trains the whole text."""
    rows = formats.rows_of(batch)
    if fmt in ("input_output", "prompt_completion", "alpaca"):
        if fmt == "input_output":
            pairs = [formats.combine_input_output(r["input"], r["output"]) for r in rows]
        elif fmt == "prompt_completion":
            pairs = [formats.prompt_completion_text(r["prompt"], r["completion"]) for r in rows]
        else:
            pairs = [formats.prompt_completion_text(formats.alpaca_prompt(r), r["output"]) for r in rows]
        texts, spans = [t for t, _ in pairs], [[s] for _, s in pairs]
    else:
        if fmt == "template":
            template = formats.RowTemplate(args.data_formatter_template or "")
            texts = [template.render(r) for r in rows]
        else:
            column = args.dataset_text_field or formats.DEFAULT_TEXT_FIELD
            texts = [formats.require_text(r[column], column) for r in rows]
        spans = [formats.response_spans(t, args.response_template, args.instruction_template) for t in texts]
    if args.train_on == "all":
        return texts, [[(0, len(t))] for t in texts]
    if args.train_on == "last_response":
        return texts, [s[-1:] for s in spans]
    return texts, spans


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
    out = {"input_ids": ids, "labels": labels, "status": status, "truncated": truncated}
    if chat.SAMPLE_INFO in batch:
        out[chat.SAMPLE_INFO] = batch[chat.SAMPLE_INFO]
    if vision.IMAGES in batch:  # image-text rows written by --do_dataprocessing_only: their references
        out[vision.IMAGES] = batch[vision.IMAGES]
    return out


def _nothing_to_train_message(
    raw: datasets.Dataset, fmt: str, args: DataArgs, tokenizer: Any, status: Counter
) -> str:
    if chat.NO_ASSISTANT in status and len(status) == 1:
        return (
            f"none of the {len(raw)} conversations has an assistant turn to train"
            + (" after the prompt" if fmt == "prompt_completion" else "")
            + "; check the roles (assistant turns are trained, see docs/data.md)"
        )
    if NO_TEMPLATE in status:
        sample = render_batch(raw[:1], fmt, args, tokenizer)[0][0]
        return (
            f"--response_template {args.response_template!r} was not found in any of {len(raw)} rows; "
            f"first row renders as {excerpt(sample)}; pass a marker that occurs in the text"
        )
    return f"no row has a trained token ({dict(status)}); check --max_seq_length and the labels"
