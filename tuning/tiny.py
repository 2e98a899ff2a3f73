"""``tuning tiny-model --config DIR --out DIR``: a tiny random model from a real model's ``config.json``,
beside that model's tokenizer files: the real architecture, vocabulary, chat template and special tokens,
two float32 layers of width 32, no weights read and nothing downloaded.

Users try a model family's whole journey on a CPU in seconds with it (docs/training.md), and the tests use
it on the real configs in ``../shared/real-tokenizers/<family>``. ``DIR`` holds the real ``config.json``
and, optionally, the tokenizer files and ``generation_config.json`` (a Hub repo's small files).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from tuning.errors import ArgumentParser, UserError, run_command

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

    path = Path(source).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--config {source}: no config.json there; pass a model folder or its config.json")
    try:
        real = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--config {file} is not a JSON model config: {e}") from None
    if not isinstance(real, dict) or "model_type" not in real:
        raise UserError(f"--config {file} has no model_type; pass a Hugging Face model's config.json")
    for key in DROPPED:
        real.pop(key, None)
    small = {k: v for k, v in SCALED_DOWN.items() if k in real or k in ("head_dim",)}
    rope = real.get("rope_scaling") or real.get("rope_parameters") or {}
    original = rope.get("original_max_position_embeddings", 0) if isinstance(rope, dict) else 0
    if original > small.get("max_position_embeddings", original):  # RoPE scaling needs at least its original
        small["max_position_embeddings"] = min(original, real.get("max_position_embeddings", original))
    return AutoConfig.for_model(**{**real, **small, **overrides})


def write_tiny_from_config(source: str | Path, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """A seeded random float32 model with the real config of ``source`` scaled down, saved with
    ``source``'s tokenizer files (when it has them) to ``out_dir``; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    source, out = Path(source).expanduser(), Path(out_dir)
    folder = source if source.is_dir() else source.parent
    config = tiny_config(source, **overrides)
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as e:  # not a causal LM transformers knows
        raise UserError(f"--config {source}: cannot build a causal LM from it: {e}") from None
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:  # after save_pretrained: the real generation_config.json wins
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    return out


def has_tokenizer(folder: str | Path) -> bool:
    return any(
        (Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )


def main(argv: list[str] | None = None) -> int:
    """``tuning tiny-model --config DIR --out DIR [--seed N]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(
        prog="tuning tiny-model",
        description="Write a tiny random model (2 layers, width 32, float32) built from a real model's "
        "config.json, with that folder's tokenizer files, to try a model family without a GPU or a download.",
    )
    parser.add_argument(
        "--config", required=True, help="a folder with the real config.json (and tokenizer files)"
    )
    parser.add_argument("--out", required=True, help="the folder to write (pass it to --model_name_or_path)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")

    def body() -> int:
        args = parser.parse_args(argv)
        from tuning.logs import setup_logging

        setup_logging()
        out = write_tiny_from_config(args.config, args.out, args.seed)
        if not has_tokenizer(out):
            print(
                f"{args.config} has no tokenizer files: pass --tokenizer_name_or_path when training",
                file=sys.stderr,
            )
        print(out)
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
