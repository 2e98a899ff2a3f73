"""The ``tuning`` command: subcommands sharing the ``sft_trainer`` configuration.

``tuning train ARGS`` is ``python -m tuning.sft_trainer ARGS``.
"""

from __future__ import annotations

import sys

from tuning import audit, check, launch, merge, plan, plot, preview, sft_trainer
from tuning.errors import UserError, did_you_mean, run_command

COMMANDS = {"train": sft_trainer.main, "merge": merge.main, "preview": preview.main, "plot": plot.main}
COMMANDS["launch"] = launch.main  # one job file → accelerate launch (docs/distributed.md)
COMMANDS["plan"] = plan.main  # the memory plan without training (docs/memory.md)
COMMANDS["audit"] = audit.main  # the data audit without training (docs/data.md)
COMMANDS["check"] = check.main  # the serve-exact check on a saved folder (docs/training.md)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: tuning {{{','.join(COMMANDS)}}} [ARGS]  (tuning COMMAND --help)"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)}" if argv else "no command"
        return run_command(lambda: _refuse(f"{given}; {usage}"))
    return COMMANDS[argv[0]](argv[1:])


def _refuse(message: str) -> int:
    raise UserError(message)


if __name__ == "__main__":
    sys.exit(main())
