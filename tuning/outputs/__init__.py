"""Outputs stage: the final model folder and its model card, the run summary, the loss plot, the data
audit's files."""

from tuning.outputs.audit_report import AUDIT_HTML_NAME, AUDIT_JSON_NAME, key_numbers, run_audit
from tuning.outputs.final_model import save_final_model
from tuning.outputs.model_card import MODEL_CARD_NAME, write_model_card
from tuning.outputs.plot import LOSS_PLOT_NAME, render_loss_plot, write_loss_plot
from tuning.outputs.serve_check import check_saved_model, report_serve_check, run_serve_check
from tuning.outputs.summary import (
    RUN_SUMMARY_NAME,
    build_summary,
    peak_memory_bytes,
    summary_line,
    write_summary,
)

__all__ = [
    "AUDIT_HTML_NAME",
    "AUDIT_JSON_NAME",
    "LOSS_PLOT_NAME",
    "MODEL_CARD_NAME",
    "RUN_SUMMARY_NAME",
    "build_summary",
    "check_saved_model",
    "key_numbers",
    "peak_memory_bytes",
    "render_loss_plot",
    "report_serve_check",
    "run_audit",
    "save_final_model",
    "run_serve_check",
    "summary_line",
    "write_loss_plot",
    "write_model_card",
    "write_summary",
]
