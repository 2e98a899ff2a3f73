"""A tiny random model from a real model's ``config.json``, beside that model's tokenizer files: the real
architecture, vocabulary, chat template and special tokens, two float32 layers of width 32, no download.

``tuning tiny-model --config DIR --out DIR`` (docs/training.md) and the tests use it to try a model family
end to end on a CPU in seconds; ``DIR`` holds the real ``config.json`` and, optionally, the tokenizer files
and ``generation_config.json`` (``../shared/real-tokenizers/<family>`` in the tests: no weights).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# Everything that sets the model's size, where the real config has the key; the rest of the real config
# (vocabulary, RoPE, norms, tied embeddings, special token ids) is kept.
SCALED_DOWN = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_window_layers": 2,
    "max_position_embeddings": 4096,
    "num_local_experts": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "experts_per_token": 2,
}
# Per-layer lists sized for the real depth (derived again from num_hidden_layers), and settings that
# describe the real weights, not random ones.
DROPPED = ("layer_types", "quantization_config", "torch_dtype", "dtype", "auto_map")
# Copied byte for byte, so the folder carries the model's own chat template and stop tokens.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def tiny_config(source: str | Path, **overrides: Any) -> Any:
    """The real config of ``source`` (a folder or its ``config.json``) scaled down, ``overrides`` on top."""
    from transformers import AutoConfig

    path = Path(source)
    real = json.loads((path / "config.json" if path.is_dir() else path).read_text(encoding="utf-8"))
    for key in DROPPED:
        real.pop(key, None)
    small = {k: v for k, v in SCALED_DOWN.items() if k in real or k in ("head_dim",)}
    return AutoConfig.for_model(**{**real, **small, **overrides})


def write_tiny_from_config(source: str | Path, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """A seeded random float32 model with the real config of ``source`` scaled down, saved with
    ``source``'s tokenizer files (when it has them) to ``out_dir``; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    source, out = Path(source), Path(out_dir)
    folder = source if source.is_dir() else source.parent
    config = tiny_config(source, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:  # after save_pretrained: the real generation_config.json wins
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    return out


def has_tokenizer(folder: str | Path) -> bool:
    return any(
        (Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )
