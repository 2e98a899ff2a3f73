"""A tiny Llama and a small, fully specified tokenizer, built offline in seconds.

Used by the tests (literal expected ids) and the README demo: nothing is downloaded. Run
``python -m tuning.testing.tiny_model OUT_DIR`` to write a model folder that ``--model_name_or_path`` accepts.

The tokenizer is a character-level BPE with byte fallback, so its ids can be written by hand:
``<unk>``=0, ``<s>``=1, ``</s>``=2, ``"\\n"``=3, printable ASCII ``c`` = ``ord(c) - 28`` (space=4,
"a"=69), then the merges of :data:`MERGES` in order, then the 256 byte-fallback tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
# A few merges so that tokenization depends on context the way real BPE does: ".\n" and ":\n" swallow
# the newline a template such as "\n### Response:" starts with.
MERGES = [(".", "\n"), (":", "\n"), ("#", "#"), ("##", "#"), ("t", "h"), ("e", " "), (" ", "t")]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer():
    """The tiny tokenizer as a transformers fast tokenizer (no pad token, on purpose)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0, **overrides):
    """A randomly initialised two-layer Llama (float32, seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    params = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**params)).float()


def write_tiny_model(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Save the tiny model and tokenizer to ``out_dir`` (safetensors) and return the folder."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=seed, **overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    from tuning.testing import command_line

    print(
        write_tiny_model(*command_line(sys.argv[1:], "usage: python -m tuning.testing.tiny_model OUT_DIR", 1))
    )
