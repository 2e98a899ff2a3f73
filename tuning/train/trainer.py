"""Train stage: a thin ``transformers.Trainer`` subclass and the function that assembles it.

The training loop is Hugging Face's; we add only what it lacks, through its extension points.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer

from tuning.config import TrainArgs
from tuning.data import IGNORE_INDEX, PaddingFreeCollator, PreparedData
from tuning.model import LABEL_ONLY_CHUNK_TOKENS, PrecisionPlan, causal_lm, generation_use_cache
from tuning.train.callbacks import TrainingLogCallback
from tuning.train.checkpoints import SafeCheckpointsMixin
from tuning.train.distributed import ShardingReport, check_checkpoint_storage, route_cpu_fsdp
from tuning.train.loss import label_only_forward, resolve_loss_implementation, verify_label_only
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
        self.loss_decision = resolve_loss_implementation(
            getattr(self.args, "loss_implementation", "standard"), self.model, self.args
        )
        self.loss_implementation = self.loss_decision.loss
        self._verify_loss = self.loss_decision.verify  # checked on the first training batch
        self.oom_recovery = oom_recovery_enabled(self.args)
        self.oom_stop: StopAllRanks | None = None  # several processes: started with the first step
        self.oom_logged_steps: set[int] = set()
        self.step_micro_batches: list = []
        self.split_micro_batches: dict[int, list] = {}

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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # checkpoints and the final model alike: config.json carries the base's use_cache, not training's
        with generation_use_cache(self.model):
            super().save_model(output_dir, _internal_call)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # trackers and the progress line read the token count from the log record
            logs["trained_tokens"] = self.trained_tokens
        super().log(logs, start_time)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if model.training and "labels" in inputs:
            # the model shifts labels by one: the first position never carries loss
            self.trained_tokens += int((inputs["labels"][..., 1:] != IGNORE_INDEX).sum())
        if self._verify_loss and model.training and "labels" in inputs:
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
        if self.loss_implementation == "label_only" and "labels" in inputs:
            with label_only_forward(model):
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )


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
    if data.validation is None and args.eval_strategy != "no":
        logger.warning("eval_strategy=%s but no --validation_data_path; not evaluating", args.eval_strategy)
        args.eval_strategy = "no"
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=choose_collator(
            args.padding_free, model, tokenizer, packed=_packed_samples(data.train)
        ),
        processing_class=tokenizer,
        callbacks=[TrainingLogCallback(args.output_dir), ShardingReport(), *(callbacks or [])],
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, plan),
    )
    trainer.fingerprint = fingerprint  # recorded in every checkpoint, checked when a run resumes from it
    trainer.remove_callback(PrinterCallback)  # ours prints progress without the raw log dicts
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RunProgress())
    return trainer
