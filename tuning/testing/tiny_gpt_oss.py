"""A tiny gpt-oss checkpoint in the real MXFP4 layout, built offline (tests, the GPU check script).

The real ``openai/gpt-oss-*`` checkpoints store each expert weight as two tensors: ``*_blocks``
(uint8, two E2M1 4-bit codes per byte, low nibble first) and ``*_scales`` (uint8 E8M0 exponents,
biased by 127), one scale per 32 consecutive values along the input dimension. transformers reads that
layout (``Mxfp4Dequantize``); its own writer (``quantize_to_mxfp4``) needs the triton kernels from the
hub, which we can't fetch offline on CPU, hence :func:`pack_mxfp4`. Run
``python -m tuning.testing.tiny_gpt_oss OUT_DIR`` to write a folder that ``--model_name_or_path`` accepts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

# E2M1 code → value, the order transformers' FP4_VALUES uses (bit 3 is the sign).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
# what the real checkpoints leave unquantized (their config.json's modules_to_not_convert)
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def pack_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an expert weight ``[experts, in, out]`` (the model's layout) to ``(blocks, scales)``:
    ``blocks[e, o, g, k]`` packs inputs ``32g + 2k`` (low nibble) and ``32g + 2k + 1`` (high nibble) of
    output ``o``; ``scales[e, o, g]`` is ``127 + log2`` of their common scale. Round to nearest."""
    experts, n_in, n_out = weight.shape
    rows = weight.transpose(1, 2).reshape(experts, n_out, n_in // BLOCK, BLOCK).float()
    amax = rows.abs().amax(dim=-1, keepdim=True).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # largest value maps to at most 6
    values = torch.tensor(E2M1_VALUES)
    codes = (rows / 2.0**exponent).unsqueeze(-1).sub(values).abs().argmin(dim=-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exponent.squeeze(-1) + 127).to(torch.uint8).contiguous()


def unpack_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The exact float32 weight ``[experts, in, out]`` that ``(blocks, scales)`` encode."""
    values = torch.tensor(E2M1_VALUES)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()  # [e, out, groups, 32]
    rows = values[codes] * torch.pow(2.0, scales.float() - 127).unsqueeze(-1)
    return rows.flatten(-2).transpose(1, 2).contiguous()


def build_gpt_oss(vocab_size: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised two-layer gpt-oss (4 experts, top-2, attention sinks), float32, seeded."""
    from transformers import GptOssConfig, GptOssForCausalLM

    params = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=64,
        head_dim=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
        router_aux_loss_coef=0.9,
        initializer_range=0.2,  # experts spread over several MXFP4 scales
    )
    params.update(overrides)
    torch.manual_seed(seed)
    return GptOssForCausalLM(GptOssConfig(**params)).float()


def write_tiny_gpt_oss(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny gpt-oss whose expert weights are MXFP4 blocks + scales, with the tiny tokenizer."""
    from safetensors.torch import save_file

    from tuning.testing.tiny_model import build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_gpt_oss(overrides.pop("vocab_size", len(tokenizer)), seed=seed, **overrides)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[-1] in EXPERT_WEIGHTS:
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = pack_mxfp4(tensor)
        else:
            tensors[name] = tensor.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    from tuning.testing import command_line

    print(
        write_tiny_gpt_oss(
            *command_line(sys.argv[1:], "usage: python -m tuning.testing.tiny_gpt_oss OUT_DIR", 1)
        )
    )
