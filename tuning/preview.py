"""``tuning preview``: what the model will be trained on, before training.

Takes the training flags (``--data_config_path`` or ``--training_data_path``, ``--model_name_or_path``,
the format flags) plus ``--preview N`` (default 3). Per dataset it prints counts (samples, tokens,
trained tokens, truncated samples, samples dropped for having no trained token) and the first N
processed samples with the trained tokens marked: green on a terminal, ``[[...]]`` otherwise. Nothing
is trained and no model weights are loaded.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path
from typing import Any

from tuning.config import build_parser, command_options, output_dir_hint, parse_command_line
from tuning.data import (
    IGNORE_INDEX,
    IMAGES,
    SAMPLE_INFO,
    DataStats,
    check_data_config,
    collapse_image_runs,
    image_markers,
    preview_parts,
    trained_pieces,
)
from tuning.errors import UserError, run_command
from tuning.logs import setup_logging
from tuning.model import load_encoding

DEFAULT_SAMPLES = 3
_GREEN, _RESET = "\033[32;1m", "\033[0m"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()
    return run_command(lambda: _preview(argv), lambda: output_dir_hint(argv))


def _preview(argv: list[str]) -> int:
    parser = build_parser()
    own = command_options(
        parser, "preview", "--model_name_or_path M (--training_data_path F | --data_config_path F)"
    )
    own.add_argument(
        "--preview", type=int, default=DEFAULT_SAMPLES, metavar="N", help="Samples shown per dataset."
    )
    parser.set_defaults(output_dir=str(Path(tempfile.gettempdir()) / "tuning-preview"))  # never written
    config, extras = parse_command_line(argv, parser)
    if extras.preview < 0:
        raise UserError(f"--preview takes a number of samples, got {extras.preview}")
    check_data_config(config.data, config.train.max_steps)
    enc = load_encoding(config.model, config.data)  # as the run reads its data
    parts = preview_parts(config.data, enc.tokenizer, enc.max_len, enc.stop_ids, enc.processor)
    color = sys.stdout.isatty()
    print(render_preview(parts, enc.tokenizer, extras.preview, color=color, processor=enc.processor))
    return 0


def render_preview(
    parts: list[tuple[str, Any, DataStats | None]],
    tokenizer: Any,
    n: int,
    *,
    color: bool,
    processor: Any = None,
) -> str:
    """Counts and the first ``n`` samples per dataset; an image-text model's images show as one marker
    each, ``[image: N tokens]``, where its N image tokens are."""
    legend = f"{_GREEN}trained tokens{_RESET}" if color else "[[trained tokens]]"
    lines = [f"preview: {legend} carry loss; everything else is context only"]
    for name, dataset, stats in parts:
        lines.append(f"== {name}: {counts_line(stats)}")
        for i, row in enumerate(itertools.islice(iter(dataset), n)):
            ids, labels = row["input_ids"], row["labels"]
            trained = sum(1 for t in labels if t != IGNORE_INDEX)
            part = ""
            if SAMPLE_INFO in row and row[SAMPLE_INFO][1] > 1:  # a conversation split into several samples
                part = f" (part {row[SAMPLE_INFO][0] + 1} of {row[SAMPLE_INFO][1]} of one conversation)"
            lines.append(f"-- sample {i}: {len(ids)} tokens, {trained} trained{part}")
            if processor is not None and row.get(IMAGES):
                ids, labels, runs = collapse_image_runs(ids, labels, processor)
                lines.append(
                    image_markers(mark_trained(ids, labels, tokenizer, color=color), processor, runs)
                )
            else:
                lines.append(mark_trained(ids, labels, tokenizer, color=color))
    return "\n".join(lines)


def counts_line(stats: DataStats | None) -> str:
    if stats is None:
        return "streaming: counts are not computed"
    split = ""
    if stats.conversations_split:
        split = f"; {stats.conversations_split} conversations split into {stats.split_samples} samples"
    return (
        f"{stats.kept} samples from {stats.rows_kept} of {stats.rows} rows kept{split}; {stats.total_tokens} "
        f"tokens, {stats.trained_tokens} trained, {stats.truncated} truncated, "
        f"{sum(stats.dropped.values())} samples dropped with no trained token"
    )


def mark_trained(ids: list[int], labels: list[int], tokenizer: Any, *, color: bool) -> str:
    """The sample's text with each run of trained tokens marked."""
    return "".join(
        (f"{_GREEN}{piece}{_RESET}" if color else f"[[{piece}]]") if trained else piece
        for piece, trained in trained_pieces(ids, labels, tokenizer)
    )
