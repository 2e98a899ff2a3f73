"""Train stage: Trainer assembly, callbacks, checkpoints, signals, distributed helpers, progress."""

from tuning.train.callbacks import TRAINING_LOGS_NAME, TrainingLogCallback, read_training_logs
from tuning.train.checkpoints import (
    check_resumable,
    checkpoint_layout,
    checkpoint_world_size,
    is_complete,
    latest_complete_checkpoint,
    list_checkpoints,
    out_of_space,
    resume_checkpoint,
)
from tuning.train.distributed import (
    DEEPSPEED_MISSING,
    barrier,
    deepspeed_installed,
    exit_process,
    full_state_dict,
    launch_defaults,
    leave_process_group,
    per_rank,
    select_cpu_backend,
    set_seed,
)
from tuning.train.progress import log_run_start
from tuning.train.trainer import SFTTrainer, build_trainer

__all__ = [
    "DEEPSPEED_MISSING",
    "TRAINING_LOGS_NAME",
    "SFTTrainer",
    "TrainingLogCallback",
    "barrier",
    "build_trainer",
    "check_resumable",
    "checkpoint_layout",
    "checkpoint_world_size",
    "deepspeed_installed",
    "exit_process",
    "full_state_dict",
    "is_complete",
    "launch_defaults",
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
]
