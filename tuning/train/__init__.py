"""Train stage: Trainer assembly, callbacks, and outputs."""

from tuning.train.callbacks import TRAINING_LOGS_NAME, TrainingLogCallback, read_training_logs
from tuning.train.checkpoints import latest_complete_checkpoint, resume_checkpoint
from tuning.train.outputs import peak_memory_bytes, save_final_model, summary_line, write_summary
from tuning.train.trainer import SFTTrainer, build_trainer

__all__ = [
    "TRAINING_LOGS_NAME",
    "SFTTrainer",
    "TrainingLogCallback",
    "build_trainer",
    "latest_complete_checkpoint",
    "peak_memory_bytes",
    "read_training_logs",
    "resume_checkpoint",
    "save_final_model",
    "summary_line",
    "write_summary",
]
