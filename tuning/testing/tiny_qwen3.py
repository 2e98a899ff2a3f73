"""A tiny random Qwen3 built from the real Qwen3 config scaled down, beside the real tokenizer files
(tests, demo): the real vocabulary, chat template and stop tokens, with two float32 layers of width 32.

``python -m tuning.testing.tiny_qwen3 QWEN3_TOKENIZER_DIR OUT_DIR`` writes a folder that
``--model_name_or_path`` accepts; ``QWEN3_TOKENIZER_DIR`` holds the real ``config.json``,
``generation_config.json`` and tokenizer files (``../shared/real-tokenizers/qwen3``: no weights).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

# Everything that sets the model's size; the rest of the real config (vocabulary, RoPE, norms, tied
# embeddings, special token ids) is kept.
SCALED_DOWN = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_window_layers": 2,
    "max_position_embeddings": 4096,
}
# Copied byte for byte, so the folder carries the model's own chat template and stop tokens.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def write_tiny_qwen3(source: str | Path, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """A seeded random float32 Qwen3 with the real config of ``source`` scaled down (``overrides`` on
    top), saved with ``source``'s tokenizer files to ``out_dir``; returns the folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source, out = Path(source), Path(out_dir)
    real = AutoConfig.from_pretrained(source).to_dict()
    real.pop("layer_types", None)  # one entry per real layer: derived again from num_hidden_layers
    config = AutoConfig.for_model(**{**real, **SCALED_DOWN, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:  # after save_pretrained: the real generation_config.json wins
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tuning.testing.tiny_qwen3 QWEN3_TOKENIZER_DIR OUT_DIR")
    print(write_tiny_qwen3(sys.argv[1], sys.argv[2]))
