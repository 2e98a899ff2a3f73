"""``loss.png``: training (and validation) loss against step, from ``training_logs.jsonl``.

Written at the end of every run (also a failed one), and by ``tuning plot OUTPUT_DIR`` for any
run folder (also one still training, or one from another machine). matplotlib is the ``plot`` extra: a
missing matplotlib or an unreadable log never fails a training run, the plot is skipped with one line
saying why.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tuning.errors import UserError
from tuning.train import TRAINING_LOGS_NAME, read_training_logs

logger = logging.getLogger(__name__)

LOSS_PLOT_NAME = "loss.png"


def render_loss_plot(output_dir: str | Path, target: str | Path | None = None) -> Path:
    """Draw the losses of ``output_dir/training_logs.jsonl`` to ``target`` (default ``output_dir/loss.png``)."""
    out = Path(output_dir)
    if not (out / TRAINING_LOGS_NAME).is_file():
        raise UserError(f"no {TRAINING_LOGS_NAME} in {out}; pass the output_dir of a training run")
    train = read_training_logs(out, "training_loss")
    valid = read_training_logs(out, "validation_loss")
    if not train and not valid:
        raise UserError(f"{out / TRAINING_LOGS_NAME} has no loss records yet; plot again after a log step")
    try:
        # the object API, not pyplot: no global figure state, no GUI backend picked from the environment
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("matplotlib is not installed; install it with: pip install 'tuning[plot]'") from None
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for records, label, style in ((train, "training", "-"), (valid, "validation", "o--")):
        if records:
            style = "o" if len(records) == 1 else style  # a one-point line is invisible
            ax.plot([r["step"] for r in records], [r["value"] for r in records], style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"loss: {out.resolve().name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(target) if target else out / LOSS_PLOT_NAME
    fig.savefig(path)
    return path


def write_loss_plot(output_dir: str | Path) -> Path | None:
    """End-of-run plot; never raises (the run is done, a plot is not worth failing it)."""
    try:
        return render_loss_plot(output_dir)
    except UserError as e:
        logger.info("%s not written: %s", LOSS_PLOT_NAME, e)
    except Exception as e:  # a plotting bug must not turn a finished run into a failed one
        logger.warning("%s not written: %s: %s", LOSS_PLOT_NAME, type(e).__name__, e)
    return None
