"""Train stage: Trainer assembly, callbacks, checkpoints, the resume decision, progress."""

from tuning.train.callbacks import TRAINING_LOGS_NAME, TrainingLogCallback, read_training_logs
from tuning.train.checkpoints import clean_output_dir, latest_complete_checkpoint
from tuning.train.fingerprint import run_fingerprint
from tuning.train.progress import log_run_start
from tuning.train.records import pending_dir, promote_pending, start_pending
from tuning.train.resume import explicit_checkpoint, resume_checkpoint
from tuning.train.trainer import SFTTrainer, build_trainer

__all__ = [
    "TRAINING_LOGS_NAME",
    "SFTTrainer",
    "TrainingLogCallback",
    "build_trainer",
    "clean_output_dir",
    "explicit_checkpoint",
    "latest_complete_checkpoint",
    "log_run_start",
    "pending_dir",
    "promote_pending",
    "read_training_logs",
    "resume_checkpoint",
    "run_fingerprint",
    "start_pending",
]
