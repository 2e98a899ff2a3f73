"""``tuning plot OUTPUT_DIR [--out FILE]``: draw ``loss.png`` for any run folder."""

from __future__ import annotations

import argparse
import sys

from tuning.errors import UserError
from tuning.outputs import render_loss_plot


def main(argv: list[str] | None = None) -> int:
    """``tuning plot OUTPUT_DIR [--out FILE]``."""
    parser = argparse.ArgumentParser(
        prog="tuning plot", description="Draw loss.png from training_logs.jsonl."
    )
    parser.add_argument("output_dir", help="a run's output_dir (the folder holding training_logs.jsonl)")
    parser.add_argument("--out", default=None, help="where to write the PNG (default OUTPUT_DIR/loss.png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = render_loss_plot(args.output_dir, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
