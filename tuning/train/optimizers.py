"""The optimizer of each memory mode (``--master_weights``, docs/memory.md).

``float32`` and ``half`` use whatever ``--optim`` names, built by the Trainer as usual. ``kahan`` keeps
bfloat16 weights and AdamW state and compensates each update's rounding error (Kahan summation): a
bfloat16 buffer per weight carries what bf16 rounding dropped, so a 1e-5 step that is a fraction of a
bf16 ulp still accumulates, as in float32 (measured in benchmarks/RESULTS.md). The optimizer is
torch-optimi's ``AdamW(kahan_sum=True)`` (foreach kernels, a fused Triton kernel on GPUs), handed to the
Trainer through its ``optimizer_cls_and_kwargs`` hook, so parameter groups (no weight decay on biases
and norms), schedulers, checkpoints and resume are the Trainer's own.
"""

from __future__ import annotations

from typing import Any

from tuning.config import TrainArgs
from tuning.errors import UserError
from tuning.model import PrecisionPlan

OPTIMI_INSTALL_HINT = "pip install torch-optimi (a dependency of tuning: reinstall it with pip install -e .)"


def optimizer_cls_and_kwargs(args: TrainArgs, plan: PrecisionPlan) -> tuple[type, dict[str, Any]] | None:
    """(optimizer class, its kwargs) for the Trainer; None leaves ``--optim`` to the Trainer."""
    if plan.master_weights != "kahan":
        return None
    try:
        from optimi import AdamW
    except ImportError:
        raise UserError(
            f"--master_weights kahan needs the torch-optimi package: {OPTIMI_INSTALL_HINT}"
        ) from None
    kwargs = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,  # the Trainer's parameter groups set it per group
        "kahan_sum": True,
    }
    return AdamW, kwargs
