"""What accelerate's FSDP needs from us: a CPU compatibility layer, and rank-aware helpers for writes.

The distributed engine is accelerate over ``torch.distributed`` FSDP; nothing here shards or gathers
weights. Our own communication is limited to barriers and gathering one number per rank (token and
parameter counts, the loss summed since the last log line when a checkpoint is saved).

Why a compatibility layer: accelerate 1.15 turns on FSDP only for accelerator backends. Under
``accelerate launch`` with an FSDP config on CPU (gloo), ``AcceleratorState`` leaves the job as
``MULTI_CPU`` and ``prepare`` silently wraps the model in DDP, so every rank holds the whole model and
CI would "pass" without ever sharding. ``distributed_type: MULTI_CPU`` is no way out either: it starts
one process. :func:`route_cpu_fsdp` moves that one case over to FSDP, exactly as accelerate does for
GPUs (plugin from the ``FSDP_*`` environment, mixed precision applied to it). It is a no-op whenever
accelerate already chose FSDP, so on GPUs it never runs; ``tests/test_distributed.py`` fails loudly if
accelerate starts routing CPU jobs itself (then this module can go).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, gather
from transformers import TrainerCallback

from tuning.compat import accelerate as accelerate_private
from tuning.compat import deepspeed as deepspeed_private
from tuning.errors import UserError, exit_process  # noqa: F401 (exit_process: part of tuning.train's surface)
from tuning.model import Topology, topology_of

logger = logging.getLogger("tuning")


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it exports ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def topology(args: Any) -> Topology:
    """How this run is spread, for the memory plan: processes, and whether FSDP shards (an FSDP
    ``accelerate launch`` config or ``--fsdp``), with its activation checkpointing and offload settings
    (exported by accelerate launch as ``FSDP_*``)."""
    return topology_of(
        args.world_size,
        fsdp=fsdp_requested() or bool(getattr(args, "fsdp", None)),
        deepspeed=deepspeed_requested() or bool(getattr(args, "deepspeed", None)),
        activation_checkpointing=os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true",
        offload=os.environ.get("FSDP_OFFLOAD_PARAMS", "").lower() == "true",
    )


def select_cpu_backend() -> None:
    """Before the training arguments exist: on a machine without accelerators, tell accelerate that a
    multi-process FSDP launch is a CPU job.

    Without this, ``TrainingArguments`` sets up a non-CPU ``PartialState`` that finds no GPU and reports
    one process: every rank then trains alone on all the data. accelerate reads ``ACCELERATE_USE_CPU``
    itself (it is what ``accelerate launch --cpu`` exports), so this is configuration, not a patch.
    """
    if fsdp_requested() and _world_size() > 1 and not torch.accelerator.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_requested() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (it exports ``ACCELERATE_USE_DEEPSPEED``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


DEEPSPEED_MISSING = (
    "DeepSpeed is not installed; pip install 'tuning[deepspeed]' (or pip install deepspeed), "
    "or launch with the FSDP config instead"
)


def launch_defaults() -> dict[str, Any]:
    """Training-argument defaults this launch needs, before the arguments exist (they set up devices).

    A DeepSpeed launch on a machine without accelerators: accelerate's ``PartialState`` picks a backend
    only for accelerators, so with none it reports one process and every rank would train alone on all
    the data (DeepSpeed then stops on its batch-size check). Naming gloo (``--ddp_backend gloo``, which
    the user can still override) is all it needs; DeepSpeed's own CPU accelerator does the rest.
    Also refuses a DeepSpeed launch without the package: one line, exit 1, instead of a traceback.
    """
    if not deepspeed_requested():
        return {}
    if not deepspeed_installed():
        raise UserError(DEEPSPEED_MISSING)
    if _world_size() > 1 and not torch.accelerator.is_available():
        return {"ddp_backend": "gloo"}
    return {}


def route_cpu_fsdp(accelerator: Any) -> bool:
    """Make a CPU job launched with an FSDP config really use FSDP. Returns whether it changed anything.

    Must run right after the ``Accelerator`` is built and before ``prepare``.
    """
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested():
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch exported
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    logger.info("accelerate chose MULTI_CPU (DDP) for an FSDP launch on CPU: routing it to FSDP")
    state.distributed_type = DistributedType.FSDP
    # as AcceleratorState does at the end of its own set-up: a later AcceleratorState() copies the
    # PartialState fields back, which would otherwise silently undo the routing
    accelerate_private.set_shared_distributed_type(DistributedType.FSDP)
    return True


def check_checkpoint_storage(args: Any, accelerator: Any, fsdp: bool) -> None:
    """``--save_on_each_node`` says the machines share no storage: each machine's first process writes
    its own copy of every checkpoint. That works for a full state dict (gathered onto one process), not
    for sharded FSDP checkpoints: each machine's folder would hold only its own ranks' shards, and only
    machine 0 the torch.distributed.checkpoint metadata, under a marker that says complete."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    sharded = fsdp and plugin is not None and "SHARDED" in str(plugin.state_dict_type)
    if args.save_on_each_node and sharded and accelerator.num_processes > local:
        raise UserError(
            "--save_on_each_node (machines without shared storage) cannot hold sharded checkpoints "
            "(fsdp_state_dict_type SHARDED_STATE_DICT): each machine would keep only its own ranks' shards; "
            "put --output_dir on storage every machine sees, or use fsdp_state_dict_type FULL_STATE_DICT"
        )


@contextlib.contextmanager
def full_state_dict(trainer: Any) -> Iterator[None]:
    """Gather full weights for the final save even when checkpoints are sharded.

    ``Trainer.save_model`` under FSDP writes nothing unless the plugin's state dict type is
    ``FULL_STATE_DICT``; with ``SHARDED_STATE_DICT`` (the sensible choice for 70B+ checkpoints) the final
    folder would be empty. DeepSpeed ZeRO-3 likewise writes an empty model file and its own shards
    unless ``stage3_gather_16bit_weights_on_model_save`` is on. Every rank must enter this, since
    gathering is collective.
    """
    engine = getattr(trainer, "model_wrapped", None) if trainer.is_deepspeed_enabled else None
    zero = deepspeed_private.zero_config(engine)
    if zero is not None and not zero.gather_16bit_weights_on_model_save:
        zero.gather_16bit_weights_on_model_save = True  # what DeepSpeed reads at save time
        try:
            yield
        finally:
            zero.gather_16bit_weights_on_model_save = False
        return
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if not trainer.is_fsdp_enabled or plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        yield
        return
    saved = (plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config)
    plugin.state_dict_config = plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        yield
    finally:
        plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config = saved


def _held(p: Any) -> int:
    if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: the parameter is a placeholder, its partition is here
        return p.ds_tensor.numel()
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def local_parameter_count(model: Any) -> int:
    """Parameters this rank holds: its shard of each FSDP2 (DTensor) or ZeRO-3 parameter, all of a plain one."""
    return sum(_held(p) for p in model.parameters())


def per_rank(value: int | float) -> list:
    """``value`` from every rank, in rank order (just ``[value]`` when not distributed). Floats travel
    as float64, so a float32 value (a loss sum) arrives exactly."""
    state = PartialState()
    if state.num_processes == 1:
        return [value]
    is_float = isinstance(value, float)
    tensor = torch.tensor([value], dtype=torch.float64 if is_float else torch.int64, device=state.device)
    values = gather(tensor).tolist()
    return [float(v) for v in values] if is_float else [int(v) for v in values]


class ShardingReport(TrainerCallback):
    """One line at the start of training: how many parameters each rank holds, so "is it really
    sharded?" is answered by the log (and asserted by the tests) rather than assumed."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or PartialState().num_processes == 1:
            return
        counts = per_rank(local_parameter_count(model))
        if state.is_world_process_zero:
            kind = PartialState().distributed_type.value
            logger.info("%s: parameters held per rank %s", kind, ", ".join(map(str, counts)))


def set_seed(seed: int) -> None:
    """Seed every RNG before the model is built. The Trainer seeds only once it exists, after LoRA
    has already drawn its initial weights from whatever state each process's RNG happened to be in."""
    transformers.set_seed(seed)


def leave_process_group(wait: bool = False) -> None:
    """End this rank's part in ``torch.distributed``. ``wait`` (only after a successful run, when every
    rank gets here) first waits for all ranks, so no rank exits and closes its gloo connections while
    another still holds the group: seen here as rank 0 aborting ("terminate called without an active
    exception") after a finished run. After a failure it is a local call: no rank waits for a dead one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    PartialState().wait_for_everyone()
