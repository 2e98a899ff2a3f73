"""``tuning check DIR --training_data_path FILE [data flags]``: the serve-exact check on any saved folder.

DIR is a model folder or an adapter folder as a server would be given it (``save_model_dir``, a
``checkpoint-N``, a ``tuning merge`` output); the data flags are the training run's (format, templates,
``--max_seq_length``, ``--train_on``...). Prints the checks as a table; exit 0 when they pass, 1 when one
fails (naming the mismatch). Nothing is trained and no weights are loaded (docs/training.md).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tuning.config import build_parser, parse_command_line
from tuning.errors import UserError, run_command
from tuning.logs import setup_logging
from tuning.merge import merge
from tuning.outputs import report_serve_check, run_serve_check


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()
    return run_command(lambda: _check(argv))


def _check(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        raise UserError("usage: tuning check DIR --training_data_path FILE [the run's data flags]")
    folder = Path(argv[0])
    if not folder.is_dir():
        raise UserError(f"tuning check: {folder} is not a folder; pass a saved model or adapter folder")
    parser = build_parser()
    parser.set_defaults(output_dir=str(Path(tempfile.gettempdir()) / "tuning-check"))  # never written
    config, _ = parse_command_line([*argv[1:], "--model_name_or_path", str(folder)], parser)
    if not config.data.training_data_path:
        raise UserError(
            "tuning check needs --training_data_path: the rows to check against (a data config's "
            "first dataset file works)"
        )
    result = run_serve_check(folder, config.data)  # max_seq_length capped by the model's context
    print(render_checks(result))
    failure = report_serve_check(result)
    if result.get("advice") and not failure:  # an adapter vLLM would refuse: check what merging gives
        with tempfile.TemporaryDirectory(prefix="tuning-check-merged-") as tmp:
            merged = merge(str(folder), str(Path(tmp) / "merged"))
            merged_result = run_serve_check(merged, config.data, trained=result.get("trained"))
            merged_result["folder"] = f"the merged folder (tuning merge --adapter {folder})"
            print(render_checks(merged_result))
            failure = report_serve_check(merged_result)
    if failure:
        raise UserError(failure)
    return 0


def render_checks(result: dict) -> str:
    width = max(len(c["name"]) for c in result["checks"])
    lines = [f"serve check of {result['folder']} on {result['samples']} training samples:"]
    lines += [f"  {c['name']:<{width}}  {c['result']:<11}  {c['detail']}" for c in result["checks"]]
    if result.get("advice"):
        lines.append(f"  {result['advice']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
