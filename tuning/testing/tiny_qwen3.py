"""A tiny random Qwen3 built from the real Qwen3 config scaled down, beside the real tokenizer files
(tests, demo): the real vocabulary, chat template and stop tokens, with two float32 layers of width 32.

``python -m tuning.testing.tiny_qwen3 QWEN3_TOKENIZER_DIR OUT_DIR`` writes a folder that
``--model_name_or_path`` accepts; ``QWEN3_TOKENIZER_DIR`` holds the real ``config.json``,
``generation_config.json`` and tokenizer files (``../shared/real-tokenizers/qwen3``: no weights). Any other
family: ``tuning tiny-model`` (tuning/tiny.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tuning.tiny import SCALED_DOWN, write_tiny_from_config

__all__ = ["SCALED_DOWN", "write_tiny_qwen3"]


def write_tiny_qwen3(source: str | Path, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """A seeded random float32 Qwen3 with the real config of ``source`` scaled down (``overrides`` on
    top), saved with ``source``'s tokenizer files to ``out_dir``; returns the folder."""
    return write_tiny_from_config(source, out_dir, seed, **overrides)


if __name__ == "__main__":
    from tuning.testing import command_line

    print(
        write_tiny_qwen3(
            *command_line(
                sys.argv[1:], "usage: python -m tuning.testing.tiny_qwen3 QWEN3_TOKENIZER_DIR OUT_DIR", 2
            )
        )
    )
