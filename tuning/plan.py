"""``tuning plan ARGS``: the memory plan a training run would print, without training.

Takes the training flags (``--model_name_or_path`` may be a folder with only ``config.json``; no data is
read, so ``--training_data_path`` may be left out) plus ``--device_memory SIZE`` (plan for a GPU with that
much memory instead of this machine's device), ``--num_processes N`` and ``--accelerate_config FILE``
(an ``accelerate launch`` config: ``distributed_type: FSDP`` shards weights, gradients and optimizer
state). Prints the plan; exits 1 with one line naming flags that would fit when it does not fit, as the
run itself would. No weights are read and nothing is written. See docs/memory.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from tuning.config import build_parser, command_options, output_dir_hint, parse_command_line
from tuning.errors import UserError, run_command
from tuning.files import read_mapping_file
from tuning.logs import setup_logging
from tuning.model import (
    Topology,
    check_fits,
    context_length,
    device_capacity,
    estimate,
    gpu_capacity,
    load_model_config,
    load_tokenizer,
    precision_plan,
    render,
    setup_for,
    topology_of,
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()
    return run_command(lambda: _plan(argv), lambda: output_dir_hint(argv))


def _plan(argv: list[str]) -> int:
    parser = build_parser()
    own = command_options(parser, "plan", "--model_name_or_path M [--device_memory GPU]")
    own.add_argument(
        "--device_memory",
        default=None,
        metavar="GPU",
        help="Plan for this GPU: its name (H100-80GB, A100-40GB), the size on its label (80GB) or an exact size (79.6GiB).",
    )
    own.add_argument("--num_processes", type=int, default=None, help="Processes of the launch.")
    own.add_argument("--accelerate_config", default=None, help="The accelerate launch config file.")
    parser.set_defaults(output_dir=str(Path(tempfile.gettempdir()) / "tuning-plan"))  # never written
    config, extras = parse_command_line(argv, parser, needs_data=False)
    capacity = gpu_capacity(extras.device_memory) if extras.device_memory else None  # a typo before loading
    model_config = load_model_config(config.model)
    try:
        tokenizer = load_tokenizer(config.model, config.data)
    except UserError:
        tokenizer = None  # a config-only folder: the vocabulary is the config's
    precision = precision_plan(config.model, model_config, config.peft.peft_method, config.train.optim_name)
    max_len = context_length(model_config, config.data.max_seq_length)
    setup = setup_for(config, model_config, precision, topology_from(extras), tokenizer, max_len)
    if capacity is not None:
        setup = replace(setup, gpu=True)
    else:
        capacity = device_capacity()
    memory = estimate(setup)
    print(render(memory, setup, capacity))
    problem = check_fits(memory, setup, capacity)
    if problem:
        raise UserError(problem)
    return 0


def topology_from(extras: Any) -> Topology:
    """Processes and sharding from ``--accelerate_config``, ``--num_processes`` and the environment."""
    launch: dict[str, Any] = {}
    if extras.accelerate_config:
        launch = read_mapping_file(extras.accelerate_config, "accelerate config")
    fsdp = launch.get("fsdp_config") or {}
    sharded = (
        launch.get("distributed_type") == "FSDP"
        or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    )
    processes = (
        extras.num_processes or int(os.environ.get("WORLD_SIZE", 0)) or int(launch.get("num_processes", 1))
    )
    return topology_of(
        processes,
        fsdp=sharded,
        deepspeed=launch.get("distributed_type") == "DEEPSPEED"
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true",
        activation_checkpointing=bool(fsdp.get("fsdp_activation_checkpointing", False)),
        offload=bool(fsdp.get("fsdp_offload_params", False)),
    )
