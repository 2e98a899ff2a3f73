"""Tiny random image-text models built from the real configs of ``../shared/real-processors`` scaled
down, beside the real processor files (tokenizer, image processor, chat template, stop tokens): seeded,
float32, a few hundred thousand parameters, for tests, demos and benchmarks.

``python -m tuning.testing.tiny_vlm PROCESSOR_DIR OUT_DIR`` writes a folder that
``--model_name_or_path`` accepts (``PROCESSOR_DIR``: e.g. ``../shared/real-processors/llava-1.5``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tuning.tiny import TOKENIZER_FILES

# What sets the size, per model_type; vocabulary, special token ids, image geometry and RoPE are the real ones.
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_window_layers": 2,
}
VISION = {
    "llava": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 32,
    },
    # Qwen2.5-VL: mrope_section must sum to head_dim / 2 (8 here)
    "qwen2_5_vl": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": 32,
        "fullatt_block_indexes": [1],
    },
}
ROPE = {"qwen2_5_vl": {"mrope_section": [2, 1, 1]}}
# the tokenizer files `tuning tiny-model` copies, and the processor's own
COPIED = (*TOKENIZER_FILES, "preprocessor_config.json", "processor_config.json")


def write_tiny_vlm(source: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A seeded random float32 image-text model with the real config of ``source`` scaled down, saved
    with ``source``'s processor files to ``out_dir``; returns the folder."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    source, out = Path(source), Path(out_dir)
    config = AutoConfig.from_pretrained(source)
    kind = config.model_type
    text = config.get_text_config()
    for key, value in TEXT.items():
        if hasattr(text, key):
            setattr(text, key, value)
    if hasattr(text, "layer_types"):
        text.layer_types = text.layer_types[: text.num_hidden_layers]
    if hasattr(text, "head_dim"):
        text.head_dim = text.hidden_size // text.num_attention_heads
    for key, value in VISION.get(kind, {}).items():
        setattr(config.vision_config, key, value)
    for key, value in ROPE.get(kind, {}).items():
        for holder in (text, config):
            scaling = getattr(holder, "rope_parameters", None) or getattr(holder, "rope_scaling", None)
            if isinstance(scaling, dict) and key in scaling:
                scaling[key] = value
    if kind == "llava":
        config.text_config.hidden_size = 32
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for name in COPIED:  # after save_pretrained: the real generation_config.json wins
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tuning.testing.tiny_vlm PROCESSOR_DIR OUT_DIR")
    print(write_tiny_vlm(sys.argv[1], sys.argv[2]))
