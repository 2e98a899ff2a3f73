"""``tuning plot OUTPUT_DIR [--out FILE]``: draw ``loss.png`` for any run folder."""

from __future__ import annotations

import sys

from tuning.errors import ArgumentParser, run_command
from tuning.outputs import render_loss_plot


def main(argv: list[str] | None = None) -> int:
    """``tuning plot OUTPUT_DIR [--out FILE]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(prog="tuning plot", description="Draw loss.png from training_logs.jsonl.")
    parser.add_argument("output_dir", help="a run's output_dir (the folder holding training_logs.jsonl)")
    parser.add_argument("--out", default=None, help="where to write the PNG (default OUTPUT_DIR/loss.png)")

    def body() -> int:
        args = parser.parse_args(argv)
        print(render_loss_plot(args.output_dir, args.out))
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
