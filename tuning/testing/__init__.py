"""Tiny models built offline for the tests, the demo and the benchmarks (never used by a training run).

``python -m tuning.testing.tiny_model OUT_DIR`` and ``python -m tuning.testing.tiny_gpt_oss OUT_DIR``
write model folders that ``--model_name_or_path`` accepts; for any model family from its real config,
``tuning tiny-model`` (tuning/tiny.py).
"""


def command_line(argv: list[str], usage: str, count: int) -> list[str]:
    """The ``count`` folder arguments of a ``python -m tuning.testing.X`` script; ``--help`` (or anything
    that starts with ``-``, or a wrong count) prints the usage and exits instead of becoming a folder name."""
    import sys

    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        sys.exit(0)
    if len(argv) != count or any(a.startswith("-") for a in argv):
        sys.exit(f"error: {usage}")
    return argv
