"""The ``tuning`` command: subcommands sharing the ``sft_trainer`` configuration.

``tuning train ARGS`` is ``python -m tuning.sft_trainer ARGS``. Each command's module is imported only
when it runs, so ``tuning --help`` and a mistyped command answer at once (docs/performance.md, start-up).
"""

from __future__ import annotations

import sys

from tuning.errors import UserError, did_you_mean, run_command, run_program
from tuning.logs import quiet_libraries

# Each command's module is imported inside its function: only the command that runs pays for its imports.


def _train(argv: list[str]) -> int:
    from tuning.flag_table import answer_early

    early = answer_early(argv)  # --help or a mistyped flag: before torch and transformers load
    if early is not None:
        return early
    from tuning import sft_trainer

    return sft_trainer.main(argv)


def _merge(argv: list[str]) -> int:
    from tuning import merge

    return merge.main(argv)


def _preview(argv: list[str]) -> int:
    from tuning import preview

    return preview.main(argv)


def _plot(argv: list[str]) -> int:
    from tuning import plot

    return plot.main(argv)


def _launch(argv: list[str]) -> int:  # one job file → accelerate launch (docs/distributed.md)
    from tuning import launch

    return launch.main(argv)


def _plan(argv: list[str]) -> int:  # the memory plan without training (docs/memory.md)
    from tuning import plan

    return plan.main(argv)


def _audit(argv: list[str]) -> int:  # the data audit without training (docs/data.md)
    from tuning import audit

    return audit.main(argv)


def _check(argv: list[str]) -> int:  # the serve-exact check on a saved folder (docs/training.md)
    from tuning import check

    return check.main(argv)


def _tiny_model(argv: list[str]) -> int:  # a tiny random model from a real config (docs/training.md)
    from tuning import tiny

    return tiny.main(argv)


COMMANDS = {
    "train": _train,
    "merge": _merge,
    "preview": _preview,
    "plot": _plot,
    "launch": _launch,
    "plan": _plan,
    "audit": _audit,
    "check": _check,
    "tiny-model": _tiny_model,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: tuning {{{','.join(COMMANDS)}}} [ARGS]  (tuning COMMAND --help)"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)}" if argv else "no command"
        return run_command(lambda: _refuse(f"{given}; {usage}"))
    # run_command around the command too: a stop signal while its modules import (seconds: torch,
    # transformers) ends like one anywhere else, with one line and exit 143/130; the command's own
    # run_command handles everything after that
    quiet_libraries()
    return run_command(lambda: COMMANDS[argv[0]](argv[1:]))


def train_main() -> None:
    """The ``sft_trainer`` script (``python -m tuning.sft_trainer`` starts the same way)."""
    run_program(lambda: _train(sys.argv[1:]))


def _refuse(message: str) -> int:
    raise UserError(message)


if __name__ == "__main__":
    sys.exit(main())
