"""Train stage: a thin ``transformers.Trainer`` subclass and the function that assembles it.

The training loop is Hugging Face's; we add only what it lacks, through its extension points.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer

from tuning.config import TrainArgs
from tuning.data import IGNORE_INDEX, OnlineMixingSampler, PaddingFreeCollator, PreparedData
from tuning.errors import UserError
from tuning.model import (
    LABEL_ONLY_CHUNK_TOKENS,
    PrecisionPlan,
    causal_lm,
    generation_use_cache,
    is_image_text,
    model_auto_class,
)
from tuning.train.callbacks import TrainingLogCallback
from tuning.train.checkpoints import SafeCheckpointsMixin
from tuning.train.distributed import ShardingReport, check_checkpoint_storage, per_rank, route_cpu_fsdp
from tuning.train.evaluation import EarlyStopping, EvalGenerations, prompts_from_samples
from tuning.train.loss import (
    label_only_forward,
    resolve_loss_implementation,
    token_accuracy_counts,
    verify_label_only,
)
from tuning.train.online_mixing import OnlineMixingCallback, check_online_mixing, online_mixing_loader
from tuning.train.oom import StopAllRanks, oom_recovery_enabled, recover_step
from tuning.train.optimizers import optimizer_cls_and_kwargs
from tuning.train.progress import RunProgress
from tuning.train.sparse_rows import with_sparse_rows
from tuning.train.speed import choose_collator, reuse_freed_memory, token_budget_loader

logger = logging.getLogger(__name__)


class SFTTrainer(SafeCheckpointsMixin, Trainer):
    """Counts the tokens that carried loss, for the run summary and tokens/s; checkpoints are committed
    atomically and a stop signal saves one (``tuning/train/checkpoints.py``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained_tokens = 0
        # argmax hits and trained tokens since the last log line (train) / in this evaluation (eval), this
        # rank's; summed over ranks when logged: accuracy = all hits / all trained tokens, the normalisation
        # of the loss, so accumulation, padding-free rows and process count don't change it
        self.accuracy_counts = {"train": [0, 0], "eval": [0, 0]}
        self.loss_decision = resolve_loss_implementation(
            getattr(self.args, "loss_implementation", "standard"), self.model, self.args
        )
        self.loss_implementation = self.loss_decision.loss
        self._verify_loss = self.loss_decision.verify  # checked on the first training batch
        self.oom_recovery = oom_recovery_enabled(self.args)
        self.oom_stop: StopAllRanks | None = None  # several processes: started with the first step
        self.oom_logged_steps: set[int] = set()
        self._step_accuracy: tuple[int, list[int]] = (
            -1,
            [0, 0],
        )  # (step, token accuracy counts at its start)
        self.step_micro_batches: list = []
        self.split_micro_batches: dict[int, list] = {}
        self.online_mixing: OnlineMixingSampler | None = None  # dataprocessor type odm (build_trainer)

    @property
    def decisions(self) -> dict[str, Any]:
        """What this run decided, under the names the memory plan records them (MemoryPlan.decisions)."""
        processes = self.accelerator.num_processes
        engine = (
            "fsdp"
            if self.is_fsdp_enabled
            else "deepspeed"
            if self.is_deepspeed_enabled
            else "ddp"
            if processes > 1
            else "none"
        )
        return {
            "loss": self.loss_decision.loss,
            "verify_loss": self.loss_decision.verify,
            "padding_free": isinstance(self.data_collator, PaddingFreeCollator),
            "chunk_tokens": LABEL_ONLY_CHUNK_TOKENS,
            "world_size": processes,
            "engine": engine,
            "sharded": self.is_fsdp_enabled and processes > 1,
        }

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        if not self.oom_recovery:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1 and self.oom_stop is None:
            self.oom_stop = StopAllRanks(self.accelerator.process_index, self.accelerator.num_processes)
        if self._step_accuracy[0] != self.state.global_step:  # the step's first micro-batch
            self._step_accuracy = (self.state.global_step, list(self.accuracy_counts["train"]))
        counted = self.trained_tokens
        try:
            return self.plain_training_step(model, inputs, num_items_in_batch)
        except torch.OutOfMemoryError:
            pass  # recover outside the handler: the exception's frames hold the micro-batch's tensors
        if self.oom_stop is not None:  # peers may be blocked in a collective: stop them all (oom.py)
            raise self.oom_stop.stop(inputs, self.state.global_step + 1, self.args)
        loss = recover_step(self, model, inputs, num_items_in_batch)
        # the redone micro-batches were counted when they first ran
        self.trained_tokens = counted + int((inputs["labels"][..., 1:] != IGNORE_INDEX).sum())
        return loss

    def restart_step_counts(self) -> None:
        """tuning/train/oom.py runs the step again from its first micro-batch: its token accuracy is
        counted again from the step's start (a pass that ran out of memory counted part of it)."""
        self.accuracy_counts["train"] = list(self._step_accuracy[1])

    def plain_training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items: Any
    ) -> torch.Tensor:
        """The Trainer's own step for one micro-batch (tuning/train/oom.py runs parts through it)."""
        return super().training_step(model, inputs, num_items)

    def compute_loss_context_manager(self) -> Any:
        stack = super().compute_loss_context_manager()
        if getattr(self.args, "activation_offloading", False) and self.model.training:
            # torch's own mechanism: every tensor autograd saves in this forward goes to host memory (pinned
            # on CUDA, so the copy back overlaps); under non-reentrant checkpointing the checkpoint's own
            # hooks take the layers' insides, and only what checkpointing keeps (layer inputs) is moved
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
        return stack

    def get_train_dataloader(self) -> Any:
        if self.online_mixing is not None:
            return online_mixing_loader(self, self.online_mixing)
        budget = getattr(self.args, "max_tokens_per_batch", None)
        return token_budget_loader(self, budget) if budget else super().get_train_dataloader()

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: Any = None) -> tuple[Any, Any]:
        # torch's AdamW → the same AdamW skipping embedding rows that never had a gradient, where exact
        return with_sparse_rows(*Trainer.get_optimizer_cls_and_kwargs(args, model), model)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if route_cpu_fsdp(self.accelerator):  # CPU + FSDP config: accelerate alone would pick DDP
            self.is_fsdp_enabled = True
        check_checkpoint_storage(self.args, self.accelerator, self.is_fsdp_enabled)

    def after_checkpoint_load(self, folder: Path, model: Any) -> None:
        # an image-text checkpoint holds the hub layout (saved through the model's own conversion): load
        # it as from_pretrained does, then into the model being trained, every key checked
        model = model if model is not None else self.model
        weights = folder / "model.safetensors"
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not weights.is_file():
            return  # adapters load through peft; sharded engines through accelerate
        if not is_image_text(model.config):
            return
        reloaded = model_auto_class(model.config).from_pretrained(str(folder), dtype=model.dtype)
        model.load_state_dict(reloaded.state_dict(), strict=True)
        logger.info(
            "resumed weights of %s loaded through from_pretrained (image-text checkpoint layout)", folder
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # checkpoints and the final model alike: config.json carries the base's use_cache, not training's
        with generation_use_cache(self.model):
            super().save_model(output_dir, _internal_call)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # trackers and the progress line read the token count from the log record
            logs["trained_tokens"] = self.trained_tokens
            logs.update(self._accuracy_metrics("train", ""))  # collective: every rank logs this step
            if self.online_mixing is not None:
                logs.update(self.online_mixing.log_fields())
        super().log(logs, start_time)

    def _accuracy_metrics(self, mode: str, prefix: str) -> dict[str, float | int]:
        """``{prefix}mean_token_accuracy`` and ``{prefix}window_trained_tokens`` (the trained tokens the
        record averages over, all ranks) for the counts since the last call; resets them."""
        hits, tokens = (sum(per_rank(int(v))) for v in self.accuracy_counts[mode])
        self.accuracy_counts[mode] = [0, 0]
        metrics: dict[str, float | int] = {f"{prefix}window_trained_tokens": tokens}
        if tokens:
            metrics[f"{prefix}mean_token_accuracy"] = hits / tokens
        return metrics

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        self.accuracy_counts["eval"] = [0, 0]
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        output.metrics.update(self._accuracy_metrics("eval", f"{metric_key_prefix}_"))
        return output

    def resume_record(self) -> dict[str, Any]:
        record = super().resume_record()
        # the accuracy window is part of the logging window: a resumed first log line averages as many steps
        record["accuracy_window"] = [per_rank(int(v)) for v in self.accuracy_counts["train"]]
        if self.online_mixing is not None:  # the same on every rank: rank 0's is the run's
            record["online_mixing"] = self.online_mixing.state_dict()
        return record

    def restore_from_record(self, record: dict[str, Any]) -> None:
        super().restore_from_record(record)
        if self.online_mixing is not None and record.get("online_mixing"):
            mid_pass = not float(self.state.epoch or 0).is_integer()  # else the Trainer starts a new epoch
            self.online_mixing.load_state_dict(record["online_mixing"], mid_pass)
        window = record.get("accuracy_window") or []
        rank, ranks = self.args.process_index, self.args.world_size
        if len(window) == 2:
            self.accuracy_counts["train"] = [
                v[rank] if len(v) == ranks else (sum(v) if rank == 0 else 0) for v in window
            ]

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if "labels" not in inputs:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels = inputs["labels"]  # the Trainer takes them out of inputs when it smooths labels
        # the model shifts labels by one: the first position never carries loss
        tokens = int((labels[..., 1:] != IGNORE_INDEX).sum())
        if model.training:
            self.trained_tokens += tokens
        if self._verify_loss and model.training:
            self._verify_loss = False
            agree, numbers = verify_label_only(model, inputs)
            self.loss_implementation = "label_only" if agree else "standard"
            logger.info(
                "loss: %s (auto: %s label-only %s the model's own loss on the first batch: %s)",
                self.loss_implementation,
                causal_lm_type(model),
                "equals" if agree else "differs from",
                numbers,
            )
        counts = self.accuracy_counts["train" if model.training else "eval"]
        if self.loss_implementation == "label_only":
            hits: list[torch.Tensor] = []
            # the loss is computed inside the model's call, so the Trainer scales it as the model's own
            with label_only_forward(model, correct=hits):
                loss, outputs = super().compute_loss(
                    model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            counts[0] += sum(int(h) for h in hits)
            counts[1] += tokens
            return (loss, outputs) if return_outputs else loss
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if isinstance(logits, torch.Tensor) and logits.dim() == 3:  # a fused loss (liger) returns no logits
            hit, counted = token_accuracy_counts(logits, labels)
            counts[0] += int(hit)
            counts[1] += int(counted)
        return (loss, outputs) if return_outputs else loss


def causal_lm_type(model: torch.nn.Module) -> str:
    return str(getattr(causal_lm(model).config, "model_type", type(model).__name__))


def configure_precision(args: TrainArgs, plan: PrecisionPlan) -> None:
    """Turn the precision plan into the Trainer's mixed-precision switches.

    ``TrainingArguments.__post_init__`` derives ``mixed_precision`` (what accelerate's autocast reads)
    from bf16/fp16 once; setting the switches later must set it too, or the run computes in float32.
    """
    if plan.autocast == torch.bfloat16:
        args.bf16, args.mixed_precision = True, "bf16"
    elif plan.autocast == torch.float16:
        args.fp16, args.mixed_precision = True, "fp16"


def _packed_samples(dataset: Any) -> bool:
    """Whether the rows carry per-sample positions (--packing_strategy bfd) the collator must keep."""
    return "position_ids" in (getattr(dataset, "column_names", None) or [])


def build_trainer(
    args: TrainArgs,
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    plan: PrecisionPlan,
    callbacks: list[Any] | None = None,
    fingerprint: dict | None = None,
    processor: Any = None,
    stop_ids: tuple[int, ...] = (),
) -> SFTTrainer:
    configure_precision(args, plan)
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        reuse_freed_memory()  # CPU steps re-allocate large buffers; on a GPU host RSS should shrink back
    if args.gradient_checkpointing and args.gradient_checkpointing_kwargs is None:
        # non-reentrant checkpointing lets gradients reach inputs that don't require grad (adapters)
        args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    if args.enable_jit_checkpoint:
        # what transformers' JIT checkpoint does (save on SIGTERM) our stop-on-signal protocol always does,
        # with a committed checkpoint; its own SIGTERM handler would only compete with ours
        logger.info("--enable_jit_checkpoint: SIGTERM always saves a checkpoint here; nothing to switch on")
        args.enable_jit_checkpoint = False
    if data.validation is None and (args.early_stopping_patience or args.eval_generations):
        flag = "--early_stopping_patience" if args.early_stopping_patience else "--eval_generations"
        raise UserError(
            f"{flag} needs a validation set: pass --validation_data_path (or a data config split)"
        )
    if data.validation is None and args.eval_strategy != "no":
        logger.warning("eval_strategy=%s but no --validation_data_path; not evaluating", args.eval_strategy)
        args.eval_strategy = "no"
    if processor is not None:  # the rows' image references reach the collator (no forward argument)
        args.remove_unused_columns = False
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=choose_collator(
            args.padding_free, model, tokenizer, packed=_packed_samples(data.train), processor=processor
        ),
        processing_class=tokenizer,
        callbacks=[log_file := TrainingLogCallback(args.output_dir), ShardingReport(), *(callbacks or [])],
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, plan),
    )
    if data.online_mixing is not None:
        check_online_mixing(args, data.online_mixing)
        trainer.online_mixing = OnlineMixingSampler(data.online_mixing)
        trainer.add_callback(OnlineMixingCallback(trainer, trainer.online_mixing))
    trainer.fingerprint = fingerprint  # recorded in every checkpoint, checked when a run resumes from it
    trainer.remove_callback(PrinterCallback)  # ours prints progress without the raw log dicts
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RunProgress())
    if args.early_stopping_patience:
        trainer.add_callback(
            EarlyStopping(args.early_stopping_patience, args.early_stopping_threshold, log_file)
        )
    if args.eval_generations:
        _add_eval_generations(trainer, args, data, stop_ids)
    return trainer


def _add_eval_generations(trainer: SFTTrainer, args: TrainArgs, data: PreparedData, stop_ids: tuple) -> None:
    rows = (row for _, row in zip(range(10_000), data.validation, strict=False))  # a bounded look
    prompts = prompts_from_samples(rows, args.eval_generations)
    if not prompts:
        logger.warning(
            "--eval_generations: no validation sample has a prompt before its trained tokens (all trained "
            "from their first token: text without --response_template?); no generations"
        )
        return
    if len(prompts) < args.eval_generations:
        logger.info(
            "--eval_generations %d: the validation set has %d prompts", args.eval_generations, len(prompts)
        )
    trainer.add_callback(EvalGenerations(trainer, prompts, stop_ids, args.eval_max_new_tokens))
