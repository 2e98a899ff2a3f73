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
from tuning.model import load_encoding
from tuning.outputs import AUDIT_HTML_NAME, run_audit


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()
    return run_command(lambda: _audit(argv), lambda: output_dir_hint(argv))


def _audit(argv: list[str]) -> int:
    config = parse_config(argv)
    args = config.train
    check_data_config(config.data, args.max_steps)
    enc = load_encoding(config.model, config.data)  # as the run reads its data
    data = build_datasets(config.data, enc.tokenizer, enc.max_len, enc.stop_ids, enc.processor)
    epochs = args.num_train_epochs if args.max_steps <= 0 else None
    run_audit(
        data,
        config.data,
        enc.tokenizer,
        enc.max_len,
        epochs,
        args.output_dir,
        gates_first=False,
        processor=enc.processor,
    )
    print(f"data audit written: {args.output_dir}/{AUDIT_HTML_NAME} (and data_audit.json)")
    return 0
