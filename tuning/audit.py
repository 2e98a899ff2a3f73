"""``tuning audit``: the data audit of a job, without training (docs/data.md, "Audit").

Takes the training flags (``--data_config_path`` or ``--training_data_path`` with the format flags,
``--model_name_or_path``, ``--output_dir``, the gate flags). Reads the tokenizer and the model's
``config.json``, never its weights; processes the data as the run would (the same code, so the same
``datasets`` cache a run then reuses), prints the audit table, writes ``output_dir/data_audit.json`` and
``output_dir/data_audit.html``, and exits 1 when a gate fails, 0 otherwise.
"""

from __future__ import annotations

import sys

from tuning.config import output_dir_hint, parse_config
from tuning.data import build_datasets, check_data_config
from tuning.errors import run_command
from tuning.logs import setup_logging
from tuning.model import (
    context_length,
    generation_stop_ids,
    is_image_text,
    load_model_config,
    load_processor,
    load_tokenizer,
)
from tuning.outputs import AUDIT_HTML_NAME, run_audit


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()
    return run_command(lambda: _audit(argv), lambda: output_dir_hint(argv))


def _audit(argv: list[str]) -> int:
    config = parse_config(argv)
    args = config.train
    check_data_config(config.data, args.max_steps)
    tokenizer = load_tokenizer(config.model, config.data)
    model_config = load_model_config(config.model)
    # an image-text model reads its data through its processor, as the run does (docs/vision.md)
    processor = load_processor(config.model, config.data) if is_image_text(model_config) else None
    tokenizer = processor.tokenizer if processor is not None else tokenizer
    max_len = context_length(model_config, config.data.max_seq_length)
    stop_ids = generation_stop_ids(config.model, model_config, tokenizer)
    data = build_datasets(config.data, tokenizer, max_len, stop_ids, processor)
    epochs = args.num_train_epochs if args.max_steps <= 0 else None
    run_audit(
        data, config.data, tokenizer, max_len, epochs, args.output_dir, gates_first=False, processor=processor
    )
    print(f"data audit written: {args.output_dir}/{AUDIT_HTML_NAME} (and data_audit.json)")
    return 0
