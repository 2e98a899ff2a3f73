"""Train stage: Trainer assembly, callbacks, checkpoints, the run folder (``output_dir``'s owner), the
resume decision, signals, distributed helpers, progress."""

from tuning.train.callbacks import TRAINING_LOGS_NAME, TrainingLogCallback, read_training_logs
from tuning.train.checkpoint_format import is_complete, list_checkpoints
from tuning.train.controller import build_controller
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
from tuning.train.records import AUDIT_HTML_NAME, AUDIT_JSON_NAME, new_record_path
from tuning.train.resume import resume_checkpoint
from tuning.train.run_folder import RunFolder, out_of_space
from tuning.train.trainer import SFTTrainer, build_trainer

__all__ = [
    "DEEPSPEED_MISSING",
    "EVAL_GENERATIONS_NAME",
    "EarlyStopping",
    "EvalGenerations",
    "RunFolder",
    "TRAINING_LOGS_NAME",
    "SFTTrainer",
    "TokenRate",
    "TrainingLogCallback",
    "barrier",
    "build_controller",
    "build_trainer",
    "deepspeed_installed",
    "exit_process",
    "full_state_dict",
    "generate_answers",
    "is_complete",
    "launch_defaults",
    "leave_process_group",
    "list_checkpoints",
    "log_run_start",
    "new_record_path",
    "AUDIT_HTML_NAME",
    "AUDIT_JSON_NAME",
    "out_of_space",
    "per_rank",
    "prompts_from_samples",
    "read_eval_generations",
    "read_training_logs",
    "resume_checkpoint",
    "run_fingerprint",
    "select_cpu_backend",
    "set_seed",
    "topology",
]
