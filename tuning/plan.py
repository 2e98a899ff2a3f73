"""``tuning plan ARGS``: the memory plan a training run would print, without training.

Takes the training flags (``--model_name_or_path`` may be a folder with only ``config.json``) plus:

- ``--device_memory SIZE``: plan for a GPU with this much memory (``80GB``, ``79.6GiB``) instead of this
  machine's device;
- ``--num_processes N`` and ``--accelerate_config FILE``: the processes of an ``accelerate launch`` and
  its config (``distributed_type: FSDP`` shards weights, gradients and optimizer state; also read:
  ``num_processes``, ``fsdp_activation_checkpointing``, ``fsdp_offload_params``).

Prints the plan (stdout); exits 1 with one line naming flags that would fit when it does not fit, as
the run itself would. No weights are read and nothing is written.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from tuning.config import parse_config
from tuning.errors import USER_ERROR_EXIT_CODE, UserError
from tuning.files import read_mapping_file
from tuning.model import (
    GPU_RUNTIME_RESERVE,
    Capacity,
    Topology,
    check_fits,
    context_length,
    device_capacity,
    estimate,
    gib,
    load_model_config,
    load_tokenizer,
    parse_size,
    precision_plan,
    render,
    setup_for,
)

PLAN_FLAGS = ("--device_memory", "--num_processes", "--accelerate_config")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        text, problem = plan(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    print(text)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0


def plan(argv: list[str]) -> tuple[str, str | None]:
    """(the rendered plan, the reason it does not fit or None)."""
    own, rest = split_flags(argv)
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in rest):
        rest += ["--output_dir", str(Path(tempfile.gettempdir()) / "tuning-plan")]  # never written
    if not any(a.startswith("--training_data_path") or a.startswith("--data_config") for a in rest):
        rest += ["--training_data_path", "unused.jsonl"]  # the plan reads no data
    config = parse_config(rest)
    topology = topology_from(own)
    model_config = load_model_config(config.model)
    try:
        tokenizer = load_tokenizer(config.model, config.data)
    except UserError:
        tokenizer = None  # a config-only folder: the vocabulary is the config's
    precision = precision_plan(config.model, model_config, config.peft.peft_method, config.train.optim_name)
    max_len = context_length(model_config, config.data.max_seq_length)
    setup = setup_for(config, model_config, precision, topology, tokenizer, max_len)
    if "--device_memory" in own:
        size = parse_size(own["--device_memory"])
        capacity = Capacity(
            max(size - GPU_RUNTIME_RESERVE, 0),
            f"usable on a GPU with {own['--device_memory']} ({gib(GPU_RUNTIME_RESERVE)} kept for the CUDA runtime)",
        )
        setup = type(setup)(**{**setup.__dict__, "gpu": True})
    else:
        capacity = device_capacity()
    memory = estimate(setup)
    return render(memory, setup, capacity), check_fits(memory, setup, capacity)


def split_flags(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The plan's own flags (``--flag VALUE`` or ``--flag=VALUE``) apart from the training flags."""
    own: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in PLAN_FLAGS:
            if "=" in arg:
                own[name] = arg.split("=", 1)[1]
                i += 1
                continue
            if i + 1 >= len(argv):
                raise UserError(f"{name} needs a value")
            own[name] = argv[i + 1]
            i += 2
            continue
        rest.append(arg)
        i += 1
    return own, rest


def topology_from(own: dict[str, str]) -> Topology:
    """Processes and sharding from ``--accelerate_config``, ``--num_processes`` and the environment."""
    launch: dict[str, Any] = {}
    if "--accelerate_config" in own:
        launch = read_mapping_file(own["--accelerate_config"], "accelerate config")
    fsdp = launch.get("fsdp_config") or {}
    sharded = (
        launch.get("distributed_type") == "FSDP"
        or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    )
    value = own.get("--num_processes") or os.environ.get("WORLD_SIZE") or launch.get("num_processes") or 1
    try:
        processes = int(value)
    except ValueError:
        raise UserError(f"--num_processes takes a number, got {value!r}") from None
    if processes < 1:
        raise UserError(f"--num_processes must be at least 1, got {processes}")
    return Topology(
        world_size=processes,
        sharded=sharded and processes > 1,
        activation_checkpointing=bool(fsdp.get("fsdp_activation_checkpointing", False)),
        offload=bool(fsdp.get("fsdp_offload_params", False)),
    )
