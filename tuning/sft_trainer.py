"""Entry point: ``python -m tuning.sft_trainer ARGS`` (also ``python tuning/sft_trainer.py``,
``sft_trainer``, and under ``accelerate launch``). Reads like the pipeline it runs:
config → data → model → train → outputs. Exit codes: 0 done, 1 user error, 203 internal failure,
143/130 stopped by SIGTERM/SIGINT after saving a checkpoint (docs/checkpoints.md)."""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file: import the package, not sibling folders as top-level
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parent.parent)

if __name__ == "__main__":  # a program: this module is imported under its own name inside run_command,
    # so a stop signal during the seconds of imports below ends with one line like anywhere else
    from tuning.errors import run_program

    def _start() -> int:
        from tuning.flag_table import answer_early

        early = answer_early(sys.argv[1:])  # --help or a mistyped flag: before torch and transformers
        if early is not None:
            return early
        from tuning import sft_trainer

        return sft_trainer.main(sys.argv[1:])

    run_program(_start)

import logging
import time

from tuning.config import SFTConfig, output_dir_hint, parse_config
from tuning.data import build_datasets, check_data_config, write_processed
from tuning.errors import UserError, run_command
from tuning.logs import disable_progress_bars, setup_logging
from tuning.model import (
    apply_peft,
    check_memory,
    load_encoding,
    load_model,
    precision_plan,
    quantization_config,
    setup_for,
)
from tuning.outputs import (
    build_summary,
    check_saved_model,
    report_serve_check,
    run_audit,
    save_final_model,
    summary_line,
    write_loss_plot,
    write_model_card,
    write_summary,
)
from tuning.trackers import build_trackers
from tuning.train import (
    RunFolder,
    build_controller,
    build_trainer,
    launch_defaults,
    leave_process_group,
    log_run_start,
    resume_checkpoint,
    run_fingerprint,
    select_cpu_backend,
    set_seed,
    topology,
)

logger = logging.getLogger("tuning")


def run(config: SFTConfig) -> dict:
    """Run one fine-tuning job; returns the run summary."""
    args = config.train
    if args.disable_tqdm:
        disable_progress_bars()  # the libraries' bars too, not only our progress bar
    # output_dir's contract (tuning/train/run_folder.py): one writer, debris removed, this run's records
    # replace the last run's at its first commit, a run that fails before training leaves it as found
    with RunFolder(config):
        return _train(config)


def _train(config: SFTConfig) -> dict:
    args = config.train
    tracking = build_trackers(config)  # a tracker that isn't installed fails here, before anything loads
    controller = build_controller(config.fms.trainer_controller_config_file)  # its rules checked here too
    # the tokenizer, or an image-text model's processor (docs/vision.md); the context length; stop tokens
    enc = load_encoding(config.model, config.data)
    model_config, tokenizer, processor = enc.model_config, enc.tokenizer, enc.processor
    max_len, stop_ids = enc.max_len, enc.stop_ids
    plan = precision_plan(config.model, model_config, config.peft.peft_method, args.optim_name)
    devices = topology(args)
    quant = quantization_config(
        config.quant, model_config, config.peft.peft_method, plan.load_dtype, devices.sharded
    )
    if not config.data.do_dataprocessing_only:  # the plan, and a run that can't fit, before data and weights
        setup = setup_for(config, model_config, plan, devices, tokenizer, max_len)
        check_memory(setup, args.memory_check, show=args.should_save)
    # one rank per machine (or per job, on a shared cache) tokenizes; the others then read its cache
    with args.main_process_first(local=args.process_data_once_per == "node", desc="dataset"):
        data = build_datasets(config.data, tokenizer, max_len, stop_ids, processor)
    epochs = args.num_train_epochs if args.max_steps <= 0 else None  # the audit's effective epochs
    run_audit(
        data,
        config.data,
        tokenizer,
        max_len,
        epochs,
        args.output_dir if args.should_save else None,
        gates_first=True,
        processor=processor,
    )
    if config.data.do_dataprocessing_only:  # rank 0 writes the processed shards; training is skipped
        return write_processed(data, config.data, args.output_dir) if args.should_save else {}
    set_seed(args.seed)  # new weights (adapters) start equal on every rank and in every run of a job
    model = load_model(config.model, plan, tokenizer, quant, model_config)
    model = apply_peft(config.peft, model, tokenizer, plan)
    fingerprint = run_fingerprint(config, model, data.train)  # what a resume of this run must match
    callbacks = [tracking, *tracking.trainer_callbacks, *([controller] if controller else [])]
    trainer = build_trainer(
        args,
        model,
        tokenizer,
        data,
        plan,
        callbacks,
        fingerprint=fingerprint,
        processor=processor,
        stop_ids=stop_ids,
    )
    log_run_start(config, model, data, trainer, plan)
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume_checkpoint(args, fingerprint))
    finally:
        tracking.close()  # also when training fails; a no-op after a normal end
        if args.should_save and trainer.state.log_history:  # not an earlier run's curve redrawn
            write_loss_plot(args.output_dir)  # also for a failed run: the curve up to the failure
    seconds = time.perf_counter() - start
    saved = (
        save_final_model(trainer, processor or tokenizer, args.save_model_dir, plan)
        if args.save_model_dir
        else None
    )
    summary = build_summary(trainer, result, seconds, data, saved)
    if args.should_save:
        if saved and args.serve_check != "off":  # the saved files, reloaded as a server reads them
            summary["serve_check"] = check_saved_model(saved, config.data, max_len, tokenizer, stop_ids)
        write_summary(args.output_dir, summary)
        if saved:
            write_model_card(saved, config, summary, data, quant, max_len)
        logger.info(summary_line(summary))
        check = summary.get("serve_check") or {}
        if args.serve_check == "error" and check.get("passed") is False:
            raise UserError(
                f"--serve_check error: {report_serve_check(check, log=False)} (every check: run_summary.json)"
            )
    return summary


def load_config(argv: list[str]) -> SFTConfig:
    """The validated job: flags and ``--config`` file, then what only the data stage can check."""
    config = parse_config(argv, defaults=launch_defaults())  # launch_defaults: before devices are set up
    setup_logging(debug=config.train.get_process_log_level() == logging.DEBUG)
    check_data_config(config.data, config.train.max_steps)
    return config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()

    def train() -> int:
        try:
            select_cpu_backend()  # before the training arguments set up devices
            run(load_config(argv))
            leave_process_group(wait=True)
            return 0
        finally:
            leave_process_group()  # a rank still in it at interpreter exit can abort (SIGABRT) or hang

    return run_command(train, lambda: output_dir_hint(argv))
