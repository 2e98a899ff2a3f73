"""Train stage: Trainer assembly, callbacks, checkpoints, progress."""

from tuning.train.callbacks import TRAINING_LOGS_NAME, TrainingLogCallback, read_training_logs
from tuning.train.checkpoints import latest_complete_checkpoint, resume_checkpoint
from tuning.train.progress import log_run_start
from tuning.train.trainer import SFTTrainer, build_trainer

__all__ = [
    "TRAINING_LOGS_NAME",
    "SFTTrainer",
    "TrainingLogCallback",
    "build_trainer",
    "latest_complete_checkpoint",
    "log_run_start",
    "read_training_logs",
    "resume_checkpoint",
]
