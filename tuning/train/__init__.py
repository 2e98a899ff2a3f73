"""Train stage: Trainer assembly, callbacks, checkpoints, the resume decision, signals, distributed
helpers, progress."""

from tuning.train.callbacks import TRAINING_LOGS_NAME, TrainingLogCallback, read_training_logs
from tuning.train.checkpoints import (
    check_resumable,
    checkpoint_layout,
    checkpoint_world_size,
    clean_output_dir,
    is_complete,
    latest_complete_checkpoint,
    list_checkpoints,
    out_of_space,
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
    topology,
)
from tuning.train.evaluation import (
    EVAL_GENERATIONS_NAME,
    EarlyStopping,
    EvalGenerations,
    generate_answers,
    prompts_from_samples,
    read_eval_generations,
)
from tuning.train.fingerprint import run_fingerprint
from tuning.train.progress import TokenRate, log_run_start
from tuning.train.records import new_record_path, pending_dir, promote_pending, start_pending
from tuning.train.resume import explicit_checkpoint, resume_checkpoint
from tuning.train.trainer import SFTTrainer, build_trainer

__all__ = [
    "DEEPSPEED_MISSING",
    "EVAL_GENERATIONS_NAME",
    "EarlyStopping",
    "EvalGenerations",
    "TRAINING_LOGS_NAME",
    "SFTTrainer",
    "TokenRate",
    "TrainingLogCallback",
    "barrier",
    "build_trainer",
    "check_resumable",
    "checkpoint_layout",
    "checkpoint_world_size",
    "deepspeed_installed",
    "clean_output_dir",
    "exit_process",
    "explicit_checkpoint",
    "full_state_dict",
    "generate_answers",
    "is_complete",
    "launch_defaults",
    "latest_complete_checkpoint",
    "leave_process_group",
    "list_checkpoints",
    "log_run_start",
    "new_record_path",
    "out_of_space",
    "pending_dir",
    "per_rank",
    "promote_pending",
    "prompts_from_samples",
    "read_eval_generations",
    "read_training_logs",
    "resume_checkpoint",
    "run_fingerprint",
    "select_cpu_backend",
    "set_seed",
    "start_pending",
    "topology",
]
