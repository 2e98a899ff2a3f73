"""Train stage: Trainer assembly, callbacks, checkpoints, signals, distributed helpers, progress."""

from tuning.train.callbacks import TRAINING_LOGS_NAME, TrainingLogCallback, read_training_logs
from tuning.train.checkpoints import (
    is_complete,
    latest_complete_checkpoint,
    list_checkpoints,
    out_of_space,
    resume_checkpoint,
)
from tuning.train.distributed import (
    barrier,
    exit_process,
    full_state_dict,
    leave_process_group,
    per_rank,
    select_cpu_backend,
    set_seed,
    topology,
)
from tuning.train.progress import log_run_start
from tuning.train.trainer import SFTTrainer, build_trainer

__all__ = [
    "TRAINING_LOGS_NAME",
    "SFTTrainer",
    "TrainingLogCallback",
    "barrier",
    "build_trainer",
    "exit_process",
    "full_state_dict",
    "is_complete",
    "latest_complete_checkpoint",
    "leave_process_group",
    "list_checkpoints",
    "log_run_start",
    "out_of_space",
    "per_rank",
    "read_training_logs",
    "resume_checkpoint",
    "select_cpu_backend",
    "set_seed",
    "topology",
]
