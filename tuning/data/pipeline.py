"""Data stage entry points: data arguments + tokenizer → tokenized train/validation datasets, the same
for a data file and a data config; the data config's own checks; what ``tuning preview`` shows."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from tuning.config import DataArgs
from tuning.data.audit import AuditSource, build_audit
from tuning.data.batching import pack, sample_lengths
from tuning.data.chat import read_chat_template
from tuning.data.config_datasets import process_all
from tuning.data.data_config import load_data_config
from tuning.data.formats import resolve_format
from tuning.data.loading import load_data, resolve_files
from tuning.data.mixing import build_from_data_config
from tuning.data.prepare import (
    DataStats,
    PreparedData,
    carry_chat_template,
    encoding_context,
    prepare_path,
    process_batch,
    total_stats,
)
from tuning.data.tokenize import OK
from tuning.errors import UserError


@dataclass
class ServingView:
    """A few training rows as the run trains them (``samples``: input_ids + labels) and as a server is
    given their prompts (``server_prompts``: token ids), for the serve-exact check."""

    format: str
    samples: list[dict[str, list[int]]]
    server_prompts: list[list[int]]


def serving_view(
    args: DataArgs, tokenizer: Any, max_len: int, stop_token_ids: Sequence[int], limit: int = 16
) -> ServingView:
    """The first ``limit`` rows of ``--training_data_path`` through the training pipeline, and each
    trained assistant turn's prompt the way a server builds it: the tokenizer's own
    ``apply_chat_template(..., add_generation_prompt=True)`` text, encoded without special tokens (the
    template writes them; vLLM's chat endpoint encodes so); for text with a response template, the text
    through the template encoded as the completions endpoint does (with the tokenizer's special tokens)."""
    raw = load_data(args.training_data_path)
    raw = raw.select(range(min(limit, len(raw))))
    fmt = resolve_format(args, raw.column_names)
    ctx = encoding_context(args, tokenizer, max_len, stop_token_ids)
    batch = raw[:]
    # the function training maps over the rows, called directly: datasets.map would first hash the
    # tokenizer for its cache fingerprint (11 s for a 150k vocabulary, for 16 rows)
    out = process_batch(batch, fmt=fmt, ctx=ctx)
    rows = [
        {"input_ids": list(ids), "labels": list(labels)}
        for ids, labels, status in zip(out["input_ids"], out["labels"], out["status"], strict=True)
        if status == OK
    ]
    prompts: list[list[int]] = []
    conversations = ctx.conversations(batch, fmt)
    if conversations and args.train_on == "responses":
        for c in conversations:
            for turn, message in enumerate(c.messages):
                if message.get("role") == "assistant" and turn >= max(c.first_trainable, 1):
                    text = tokenizer.apply_chat_template(
                        c.messages[:turn],
                        tools=c.tools,
                        documents=c.documents,
                        add_generation_prompt=True,
                        tokenize=False,
                        **c.kwargs,
                    )
                    prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    elif fmt == "text" and args.response_template and args.train_on == "responses":
        for text in raw[args.dataset_text_field or "text"]:
            at = text.find(args.response_template)
            if at >= 0:
                prompts.append(tokenizer(text[: at + len(args.response_template)])["input_ids"])
    return ServingView(fmt, rows, prompts)


logger = logging.getLogger(__name__)


def build_datasets(
    args: DataArgs,
    tokenizer: Any,
    max_len: int,
    stop_token_ids: Sequence[int],
    processor: Any = None,
) -> PreparedData:
    """Load, format, tokenize and mask the training (and validation) data. ``stop_token_ids`` end a
    generated turn (the model's generation config); chat turns are trained through the first of them.
    ``processor``: an image-text model's, for chat rows with images (docs/vision.md)."""
    ctx = encoding_context(args, tokenizer, max_len, stop_token_ids, processor)
    carry_chat_template(ctx)
    if args.data_config_path:
        data = build_from_data_config(ctx)
    else:
        train, fmt, stats = prepare_path(args.training_data_path, ctx)
        sources = [AuditSource(args.training_data_path, fmt, stats, "train", stats.kept, stats.kept)]
        validation = None
        if args.validation_data_path:
            validation, vfmt, vstats = prepare_path(args.validation_data_path, ctx)
            sources.append(AuditSource(args.validation_data_path, vfmt, vstats, "validation"))
        data = PreparedData(train, validation, fmt, stats, sources)
    if args.packing:  # one place for both paths: packing cuts the final (mixed) training set
        if not isinstance(data.train, datasets.Dataset):
            raise UserError("--packing needs row counts, and streamed data has none; set streaming: false")
        samples = len(data.train)
        data.train = pack(data.train, max_len, args.packing_strategy)
        tokens = sum(sample_lengths(data.train))
        logger.info(
            "packing (%s): %d samples into %d rows of up to %d tokens (%.0f%% full)",
            args.packing_strategy,
            samples,
            len(data.train),
            max_len,
            100 * tokens / (len(data.train) * max_len) if len(data.train) else 0,
        )
    return data


def check_data_config(args: DataArgs, max_steps: int) -> None:
    """Read and check the whole data config now, before any model or data is loaded; without one, that
    the data paths name files that exist (a typo is reported before the model loads and the memory plan
    prints, and before output_dir is touched)."""
    if args.chat_template_path:
        read_chat_template(args.chat_template_path)  # read again, once, by the data stage (encoding_context)
    if not args.data_config_path:
        for path in (args.training_data_path, args.validation_data_path):
            if path:
                resolve_files(path)
        return
    data_config = load_data_config(args.data_config_path)
    for dataset in data_config.datasets:  # a builder the user names may read any path (config_datasets.py)
        for path in dataset.data_paths if dataset.builder is None else ():
            resolve_files(path)
    if data_config.odm is not None and args.packing:
        raise UserError(
            f"data config {args.data_config_path}: online data mixing draws samples one by one, and --packing "
            "joins them into rows; drop --packing (padding-free batches already avoid padding)"
        )
    if data_config.dataprocessor.streaming and max_steps <= 0:
        raise UserError(
            f"data config {args.data_config_path} streams its datasets, so epochs have no length; "
            "pass --max_steps"
        )


def data_sources(args: DataArgs) -> list[tuple[str, list[str]]]:
    """(name, data paths) of every dataset the job reads: the training and validation paths, or a data
    config's datasets. What a model card lists."""
    if args.data_config_path:
        return [(d.name, list(d.data_paths)) for d in load_data_config(args.data_config_path).datasets]
    sources = [("train", [args.training_data_path])] if args.training_data_path else []
    if args.validation_data_path:
        sources.append(("validation", [args.validation_data_path]))
    return sources


def preview_parts(
    args: DataArgs,
    tokenizer: Any,
    max_len: int,
    stop_token_ids: Sequence[int],
    processor: Any = None,
) -> list[tuple[str, Any, DataStats | None]]:
    """(name, processed dataset, counts) per dataset: a data config's datasets, or the training data.
    Chat samples keep their ``chat_sample`` column ([part, parts, ...]) for the preview to show."""
    ctx = encoding_context(args, tokenizer, max_len, stop_token_ids, processor, keep_sample_info=True)
    carry_chat_template(ctx)
    if args.data_config_path:
        _, processed = process_all(ctx)
        return [(p.name, p.dataset, p.stats if hasattr(p.dataset, "__len__") else None) for p in processed]
    ds, _, stats = prepare_path(args.training_data_path, ctx)
    return [(args.training_data_path, ds, stats)]


def data_audit(data: PreparedData, args: DataArgs, max_len: int, epochs: float | None) -> dict:
    """The audit of prepared data, from its sources' counts (no data is read again); ``epochs`` is the
    run's ``num_train_epochs`` when it trains by epochs, else None (docs/data.md, "Audit")."""
    sources = list(data.sources)
    return build_audit(sources, total_stats([s.stats for s in sources]), args, max_len, epochs)
