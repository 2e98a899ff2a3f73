"""Entry point: ``python -m tuning.sft_trainer ARGS`` (also ``python tuning/sft_trainer.py``,
``sft_trainer``, and under ``accelerate launch``). Reads like the pipeline it runs:
config → data → model → train → outputs. Exit codes: 0 done, 1 user error, 203 internal failure,
143/130 stopped by SIGTERM/SIGINT after saving a checkpoint (docs/checkpoints.md)."""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file: import the package, not sibling folders as top-level
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import logging
import os
import time
import traceback

from tuning.config import SFTConfig, parse_config, save_resolved_config
from tuning.data import build_datasets, check_data_config, write_processed
from tuning.errors import (
    INTERNAL_ERROR_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    TrainingInterrupted,
    UserError,
    write_termination_log,
)
from tuning.logs import setup_logging
from tuning.model import context_length, load_model, load_model_config, load_tokenizer, precision_plan
from tuning.model.memory import setup_for
from tuning.model.memory_check import check_memory
from tuning.model.peft import apply_peft
from tuning.model.quantization import quantization_config
from tuning.outputs import build_summary, save_final_model, summary_line, write_loss_plot, write_summary
from tuning.trackers import build_trackers
from tuning.train import build_trainer, log_run_start, resume_checkpoint
from tuning.train.distributed import (
    exit_process,
    leave_process_group,
    select_cpu_backend,
    set_seed,
    topology,
)
from tuning.train.optimizers import optimizer_name

logger = logging.getLogger("tuning")


def run(config: SFTConfig) -> dict:
    """Run one fine-tuning job; returns the run summary."""
    args = config.train
    if args.should_save:  # rank 0 only: every path below is written once, even across machines
        save_resolved_config(config, args.output_dir)
    tracking = build_trackers(config)  # a tracker that isn't installed fails here, before anything loads
    tokenizer = load_tokenizer(config.model, config.data)
    model_config = load_model_config(config.model)
    plan = precision_plan(config.model, model_config, config.peft.peft_method, optimizer_name(args))
    spread = topology(args)
    quant = quantization_config(
        config.quant, model_config, config.peft.peft_method, plan.load_dtype, spread.sharded
    )
    max_len = context_length(model_config, config.data.max_seq_length)
    if not config.data.do_dataprocessing_only:  # the plan, and a run that can't fit, before data and weights
        setup = setup_for(config, model_config, plan, spread, tokenizer, max_len)
        check_memory(setup, args.memory_check, show=args.should_save)
    with args.main_process_first(desc="dataset"):  # one rank per machine tokenizes; the rest read its cache
        data = build_datasets(config.data, tokenizer, max_len)
    if config.data.do_dataprocessing_only:  # rank 0 writes the processed shards; training is skipped
        return write_processed(data, config.data, args.output_dir) if args.should_save else {}
    set_seed(args.seed)  # new weights (adapters) start equal on every rank and in every run of a job
    model = load_model(config.model, plan, tokenizer, quant, model_config)
    model = apply_peft(config.peft, model, tokenizer, plan)
    trainer = build_trainer(args, model, tokenizer, data, plan, [tracking])
    log_run_start(config, model, data, trainer, plan)
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume_checkpoint(args))
    finally:
        tracking.close()  # also when training fails; a no-op after a normal end
        if args.should_save:
            write_loss_plot(args.output_dir)  # also for a failed run: the curve up to the failure
    seconds = time.perf_counter() - start
    saved = save_final_model(trainer, tokenizer, args.save_model_dir, plan) if args.save_model_dir else None
    summary = build_summary(trainer, result, seconds, data, saved)
    if args.should_save:
        write_summary(args.output_dir, summary)
        logger.info(summary_line(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = setup_logging(argv)
    try:
        select_cpu_backend()  # before the training arguments set up devices
        config = parse_config(argv)
        check_data_config(config.data, config.train.max_steps)
        run(config)
        leave_process_group(wait=True)
        return 0
    except TrainingInterrupted as e:  # a checkpoint is saved: the scheduler reruns the command to resume
        line, code = f"interrupted: {e}", e.exit_code
    except UserError as e:
        line, code = f"error: {e}", USER_ERROR_EXIT_CODE
        if debug:
            traceback.print_exc()
    except Exception as e:  # anything not a user mistake is ours to fix: 203, with the traceback
        traceback.print_exc()
        kind = "out of memory" if "OutOfMemoryError" in type(e).__name__ else "internal error"
        line, code = (
            f"{kind}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            INTERNAL_ERROR_EXIT_CODE,
        )
    finally:
        leave_process_group()  # a rank still in it at interpreter exit can abort (SIGABRT) or hang
    print(line, file=sys.stderr)
    write_termination_log(line, _output_dir_hint(argv))
    return code


def _output_dir_hint(argv: list[str]) -> str | None:
    """``--output_dir`` from the raw command line, for the termination log when parsing itself failed."""
    for i, arg in enumerate(argv):
        if arg == "--output_dir" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--output_dir="):
            return arg.split("=", 1)[1]
    return None


if __name__ == "__main__":
    exit_code = main()
    if os.environ.get("WORLD_SIZE", "1") != "1":  # a rank under accelerate/torchrun
        exit_process(exit_code)
    sys.exit(exit_code)
