"""The memory plan's verdict: the device's memory, the printed plan, and the flags that would fit.

:mod:`tuning.model.memory` estimates; this module compares the estimate with what this process can use
(a GPU's free memory less a runtime reserve, or the RAM available on CPU), renders the plan a person
reads before the model loads, and, when it does not fit, searches the flags that would (docs/memory.md).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tuning.config import BNB_METHODS, KAHAN_OPTIMIZERS
from tuning.errors import UserError
from tuning.model.loading import precision_plan
from tuning.model.memory import GiB, MemoryPlan, ModelFacts, Setup, estimate, keeps_mxfp4, model_facts

logger = logging.getLogger(__name__)

# CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation: memory the device loses besides tensors
GPU_RUNTIME_RESERVE = 2 * GiB


def gib(n: int) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def describe_mode(setup: Setup) -> str:
    """``full fine-tuning, bfloat16 weights, kahan master weights`` and the like."""
    precision, quant = setup.precision, setup.quant
    dtype = str(precision.load_dtype).removeprefix("torch.")
    if quant.quantization_method == "bnb_4bit":
        nested = " double-quantized" if quant.use_bnb_nested_quant else ""
        base = f"{quant.bnb_4bit_quant_type}{nested} 4-bit base (QLoRA), {dtype} elsewhere"
    elif quant.quantization_method == "bnb_8bit":
        base = f"8-bit base (QLoRA), {dtype} elsewhere"
    elif keeps_mxfp4(setup):
        base = f"MXFP4 experts, {dtype} elsewhere"
    else:
        base = f"{dtype} weights"
    what = "full fine-tuning" if setup.peft.peft_method == "none" else f"{setup.peft.peft_method} adapter"
    autocast = (
        f", computing in {str(precision.autocast).removeprefix('torch.')}" if precision.autocast else ""
    )
    return f"{what}, {base}{autocast}, {precision.master_weights} master weights"


def render(plan: MemoryPlan, setup: Setup, capacity: Capacity | None = None) -> str:
    """The plan as the lines a person reads before the model loads."""
    w, topo = setup.workload, setup.topology
    adapters = setup.peft.peft_method != "none"
    share = f", FSDP share of {topo.world_size} processes" if topo.sharded else ""
    recompute = w.gradient_checkpointing or (topo.sharded and topo.activation_checkpointing)
    layers = setup.model_config.get_text_config().num_hidden_layers
    rows = [
        (
            "weights",
            plan.weights,
            f"{_count(plan.parameters - (plan.trainable if adapters else 0))} parameters as stored",
        ),
        ("adapter", plan.adapter, f"{_count(plan.trainable)} trainable parameters" if adapters else ""),
        ("gradients", plan.gradients, f"{_count(plan.trainable)} trainable parameters"),
        ("optimizer state", plan.optimizer, plan.describe["optimizer"]),
        (
            "autocast copies",
            plan.autocast_copies,
            "half-precision copies of float32 weights in the forward pass",
        ),
        ("FSDP gathered", plan.gathered, "the unsharded root unit and one decoder layer (+ prefetch)"),
        (
            "activations",
            plan.activations,
            f"{w.tokens} tokens × {layers} layers, attention {plan.describe['attention']}, gradient "
            f"checkpointing {'on' if recompute else 'off'} (on: {gib(plan.activations_checkpointed)}, "
            f"off: {gib(plan.activations_full)})"
            + (", offloaded to host memory but one layer's" if w.activation_offloading else ""),
        ),
        ("output head", plan.logits, plan.describe["logits"]),
    ]
    if plan.step_temporaries * 100 > plan.total:
        rows.append(
            ("optimizer step", plan.step_temporaries, "the update's temporaries (AdamW foreach: sqrt(v))")
        )
    lines = [
        f"memory plan per device ({describe_mode(setup)}{share}; estimated from the config, no weights read):"
    ]
    lines += [
        f"  {name:<16} {gib(n):>11}  {note}"
        for name, n, note in rows
        if n or name in ("weights", "gradients")
    ]
    verdict = ""
    if capacity is not None:
        fits = "fits" if plan.total <= capacity.bytes else "does NOT fit"
        verdict = f"  of {gib(capacity.bytes)} {capacity.what}: {fits}"
    lines.append(f"  {'peak':<16} {gib(plan.total):>11}{verdict}")
    return "\n".join(lines)


# --- the device ---


@dataclass(frozen=True)
class Capacity:
    bytes: int
    what: str


def device_capacity() -> Capacity:
    """Memory this process can use: the GPU's free memory less a runtime reserve; on CPU the RAM that is
    available now (MemAvailable, or the cgroup's limit when lower), shared by the processes on this machine."""
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        return Capacity(
            max(free - GPU_RUNTIME_RESERVE, 0),
            f"free on cuda:{index} ({name}, {gib(total)}; {gib(GPU_RUNTIME_RESERVE)} kept for the CUDA runtime)",
        )
    available = _meminfo_available()
    limit = _cgroup_available()
    source = "MemAvailable"
    if limit is not None and limit < available:
        available, source = limit, "the cgroup limit"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per = f", shared by {local} processes" if local > 1 else ""
    return Capacity(available // max(local, 1), f"CPU RAM available ({source}{per})")


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _cgroup_available() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


_UNITS = {"tib": 2**40, "gib": GiB, "mib": 2**20, "t": 2**40, "g": GiB, "m": 2**20, "b": 1}
# A GPU's memory is sold in nominal binary units: an "80 GB" A100 has 80 GiB, and some cards have a little
# less than their label (an 80 GB H100 has 79.65 GiB). Totals as the driver reports them (nvidia-smi,
# torch.cuda.mem_get_info), MiB, by the name the card is sold under.
KNOWN_GPUS = {
    "H100-80GB": 81559,
    "H200-141GB": 143771,
    "B200-180GB": 183359,
    "A100-80GB": 81920,
    "A100-40GB": 40960,
    "L40S-48GB": 46068,
    "L4-24GB": 23034,
    "A10G-24GB": 23028,
    "RTX4090-24GB": 24564,
    "T4-16GB": 15360,
}
_VENDOR_UNITS = {"tb": 2**40, "gb": GiB, "mb": 2**20}


def _squeeze(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum() or c == ".")


def parse_size(text: str) -> int:
    """``79.6GiB``, ``24G``, ``512MiB``, ``80000000000B`` → bytes (GiB and a bare G = 2^30). For a GPU's
    label (``80GB``, a named card) see :func:`gpu_memory`."""
    lowered = text.strip().lower().replace(" ", "")
    for unit, size in _UNITS.items():
        if lowered.endswith(unit):
            try:
                return int(float(lowered.removesuffix(unit)) * size)
            except ValueError:
                break
    raise UserError(
        f"--device_memory {text!r} is not a size or a known GPU; write it like 80GB, 79.6GiB or a card's name "
        f"({', '.join(KNOWN_GPUS)})"
    )


def gpu_memory(text: str) -> tuple[int, str]:
    """(bytes, where that figure comes from) for ``--device_memory``: a card's name (``H100-80GB``,
    ``a100 40gb``, ``H100`` when one size is known), the size on a GPU's label (``80GB``: the least memory
    of the cards sold as 80 GB, else 80 GiB), or an exact size (``79.6GiB``)."""
    given = _squeeze(text)
    named = {_squeeze(name): name for name in KNOWN_GPUS}
    by_family = [name for name in KNOWN_GPUS if _squeeze(name.split("-")[0]) == given]
    if given in named or len(by_family) == 1:
        name = named.get(given) or by_family[0]
        return KNOWN_GPUS[name] * 2**20, f"one {name}"
    if len(by_family) > 1:
        raise UserError(f"--device_memory {text!r} names several cards; pick one: {', '.join(by_family)}")
    for unit, size in _VENDOR_UNITS.items():
        number = given.removesuffix(unit)
        if given.endswith(unit) and number.replace(".", "", 1).isdigit():
            label = f"{number}GB" if unit == "gb" else given.upper()
            cards = [name for name in KNOWN_GPUS if name.endswith(f"-{label}")]
            if not cards:
                return int(
                    float(number) * size
                ), f"a GPU sold as {label}, read as {number} {unit[0].upper()}iB"
            least = min(cards, key=KNOWN_GPUS.__getitem__)
            among = f"; the least of {', '.join(cards)}" if len(cards) > 1 else ""
            return KNOWN_GPUS[least] * 2**20, (
                f"a GPU sold as {label}, read as {gib(KNOWN_GPUS[least] * 2**20)} (the {least}'s{among})"
            )
    return parse_size(text), f"a GPU with {text.strip()}"


def gpu_capacity(text: str) -> Capacity:
    """What a run could use on the GPU ``--device_memory`` names: its memory less the runtime reserve."""
    size, what = gpu_memory(text)
    return Capacity(
        max(size - GPU_RUNTIME_RESERVE, 0),
        f"usable on {what} ({gib(GPU_RUNTIME_RESERVE)} kept for the CUDA runtime)",
    )


# --- what would fit ---


def variant(setup: Setup, **changes: Any) -> Setup:
    """``setup`` with some flags changed, precision resolved again as the run would."""
    model_changes = changes.pop("model", {})
    if "master_weights" in model_changes:
        model_changes = {**model_changes, "half_precision_master_weights": False}
    model = replace(setup.model, **model_changes)
    peft = replace(setup.peft, **changes.pop("peft", {}))
    quant = replace(setup.quant, **changes.pop("quant", {}))
    workload = replace(setup.workload, **changes.pop("workload", {}))
    precision = precision_plan(model, setup.model_config, peft.peft_method, workload.optim)
    return replace(setup, model=model, peft=peft, quant=quant, workload=workload, precision=precision)


def _tweaks(setup: Setup) -> list[tuple[str, dict[str, Any]]]:
    """Changes within the method: free (Kahan-compensated weights), then slower (checkpointing, batch 1)."""
    w, p = setup.workload, setup.precision
    tweaks: list[tuple[str, dict[str, Any]]] = []
    full_bf16_adamw = (
        setup.peft.peft_method == "none" and p.autocast == torch.bfloat16 and w.optim in KAHAN_OPTIMIZERS
    )
    if full_bf16_adamw and p.master_weights == "float32":
        tweaks.append(("--master_weights kahan", {"model": {"master_weights": "kahan"}}))
    if not w.gradient_checkpointing:
        tweaks.append(("--gradient_checkpointing True", {"workload": {"gradient_checkpointing": True}}))
    if w.token_budget is None and w.batch_size > 1:
        batch = "--per_device_train_batch_size 1 (raise --gradient_accumulation_steps to keep the batch)"
        tweaks.append((batch, {"workload": {"batch_size": 1}}))
    return tweaks


def _methods(setup: Setup) -> list[tuple[str, dict[str, Any]]]:
    """The run's own method, then adapters (LoRA, then QLoRA) when they need less."""
    adapter = {"peft": {"peft_method": "lora"}, "model": {"master_weights": "auto"}}
    qlora = {"quant": {"quantization_method": "bnb_4bit", "load_in_4bit": True}}
    if setup.peft.peft_method == "none":
        return [
            ("", {}),
            ("--peft_method lora", adapter),
            ("--peft_method lora --quantization_method bnb_4bit", {**adapter, **qlora}),
        ]
    if setup.peft.peft_method in ("lora", "alora") and setup.quant.quantization_method not in BNB_METHODS:
        return [("", {}), ("--quantization_method bnb_4bit", qlora)]
    return [("", {})]


def _suggestions(setup: Setup) -> Iterator[tuple[str, Setup]]:
    """Flag changes that need less memory, least intrusive first: each method with every combination
    of the tweaks, fewest first."""
    tweaks = _tweaks(setup)
    for method, method_changes in _methods(setup):
        usable = [t for t in tweaks if not (method and t[0].startswith("--master_weights"))]
        for combo in itertools.chain.from_iterable(
            itertools.combinations(usable, n) for n in range(len(usable) + 1)
        ):
            if not method and not combo:
                continue  # the run as it is
            changes: dict[str, dict[str, Any]] = {k: dict(v) for k, v in method_changes.items()}
            for _, tweak in combo:
                for group, values in tweak.items():
                    changes.setdefault(group, {}).update(values)
            yield " ".join([f for f, _ in combo] + [method]).strip(), variant(setup, **changes)


def check_fits(plan: MemoryPlan, setup: Setup, capacity: Capacity) -> str | None:
    """None when the plan fits; else the one-line reason, naming flags that would fit."""
    if plan.total <= capacity.bytes:
        return None
    head = f"the memory plan needs {gib(plan.total)} per device, more than the {gib(capacity.bytes)} {capacity.what}"
    facts: dict[tuple, ModelFacts] = {}
    for flags, option in _suggestions(setup):
        key = (option.peft.peft_method, option.quant.quantization_method, option.precision)
        try:
            facts[key] = facts.get(key) or model_facts(option)
        except UserError:
            continue
        needed = estimate(option, facts[key]).total
        if needed <= capacity.bytes:
            return f"{head}; would fit ({gib(needed)}): {flags}"
    return f"{head}; no single-device setting of these flags fits: shard it with FSDP over more GPUs (docs/distributed.md)"


def check_memory(setup: Setup, mode: str, show: bool = True) -> MemoryPlan | None:
    """Print the plan (``show``: this process is the one that logs) and apply ``--memory_check``.

    ``error``: a plan that exceeds this device's memory stops the run (UserError) naming flags that
    would fit; ``warn``: it is logged and the run goes on; ``off``: nothing is estimated. An estimator
    that cannot handle the architecture never stops a run: it says so and the run goes on.
    """
    if mode == "off":
        return None
    try:
        plan = estimate(setup)
    except UserError as e:
        logger.warning("%s; going on without a memory plan", e)
        return None
    capacity = device_capacity()
    if show:
        logger.info(render(plan, setup, capacity))
    problem = check_fits(plan, setup, capacity)
    if problem and mode == "error":
        raise UserError(
            f"{problem}; `tuning plan ARGS` prints the breakdown, --memory_check warn runs anyway"
        )
    if problem:
        logger.warning(problem)
    return plan
