"""The config tree: one dataclass per stage, parsed from the command line or a YAML/JSON file.

User-facing flags stay flat and keep the fms-hf-tuning and Hugging Face names (``--learning_rate``,
``--response_template``); the grouping into dataclasses is internal. Field docstrings are the ``--help``
text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

DTYPES = ("bfloat16", "float16", "float32", "auto")
DataFormat = Literal["auto", "pretokenized", "text", "template", "input_output", "chat"]


def unescape(text: str | None) -> str | None:
    r"""Turn the escapes a shell passes through literally (``\n``, ``\t``, ``\r``, ``\\``) into characters.

    Only these four: ``str.encode().decode("unicode_escape")`` would mangle non-ASCII templates.
    """
    if text is None:
        return None
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda m: table[m.group(1)], text)


@dataclass
class ModelArgs:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local model folder or hub id (required)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or hub id; defaults to model_name_or_path."}
    )
    torch_dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "Compute dtype: bfloat16 (default), float16, float32 or auto (the checkpoint's). "
            "Half precision computes under autocast while trainable weights and optimizer state stay "
            "float32, unless --half_precision_master_weights.",
            "choices": list(DTYPES),
        },
    )
    half_precision_master_weights: bool = field(
        default=False,
        metadata={
            "help": "Keep trainable weights and optimizer state in torch_dtype instead of float32. Saves "
            "memory, but small updates vanish in bfloat16 (at lr 1e-5 training can stall)."
        },
    )
    use_flash_attn: bool = field(
        default=True, metadata={"help": "Ask for flash_attn_implementation; false asks for sdpa."}
    )
    flash_attn_implementation: str = field(
        default="flash_attention_2",
        metadata={
            "help": "Attention kernel when use_flash_attn: flash_attention_2, flash_attention_3, sdpa, "
            "eager, or a hub kernel id (kernels-community/...). Falls back to sdpa, then eager, with "
            "one warning, when it can't run here."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model repo's own code."})


@dataclass
class DataArgs:
    training_data_path: str | None = field(
        default=None,
        metadata={"help": "Training data: .json/.jsonl/.parquet/.arrow/.csv file, folder, glob or hub id."},
    )
    validation_data_path: str | None = field(default=None, metadata={"help": "Validation data, same forms."})
    data_format: DataFormat = field(
        default="auto",
        metadata={
            "help": "How rows become tokens. auto picks by the rule in docs/data.md: template flag, "
            "text-field flag, conversation flag, then the columns (input_ids, messages, input+output)."
        },
    )
    dataset_text_field: str | None = field(
        default=None, metadata={"help": "Column with the full training text."}
    )
    data_formatter_template: str | None = field(
        default=None,
        metadata={"help": "Jinja template rendering a row into text, e.g. '### Input: {{input}} ...'."},
    )
    response_template: str | None = field(
        default=None, metadata={"help": "Loss only on text after this marker (searched in the text)."}
    )
    instruction_template: str | None = field(
        default=None,
        metadata={"help": "With response_template: multi-turn text; loss stops at each instruction marker."},
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template overriding the tokenizer's."}
    )
    dataset_conversation_field: str | None = field(
        default=None, metadata={"help": "Column with a list of chat messages (default: messages)."}
    )
    add_special_tokens: list[str] | None = field(
        default=None,
        metadata={"help": "New special tokens to add to the tokenizer (embeddings are resized)."},
    )
    max_seq_length: int = field(
        default=4096, metadata={"help": "Longest sample in tokens (capped by the model's context)."}
    )

    def __post_init__(self) -> None:
        self.response_template = unescape(self.response_template)
        self.instruction_template = unescape(self.instruction_template)
        self.data_formatter_template = unescape(self.data_formatter_template)


# The established defaults of the fms-hf-tuning family, which differ from Hugging Face's own.
@dataclass
class TrainArgs(TrainingArguments):
    save_strategy: str = field(default="epoch", metadata={"help": "no | steps | epoch | best"})
    logging_strategy: str = field(default="epoch", metadata={"help": "no | steps | epoch"})
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Hugging Face integrations to report to (default none)."}
    )
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (default adamw_torch)."})
    save_model_dir: str | None = field(
        default=None,
        metadata={"help": "Where the final model goes (safetensors + config + tokenizer)."},
    )
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio); the fms-hf-tuning
    # family's commands still pass --warmup_ratio, so it stays a flag of its own.
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Linear warmup over this fraction of the total steps."}
    )

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            if self.warmup_steps:
                raise ValueError("pass either --warmup_ratio or --warmup_steps, not both")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


@dataclass
class SFTConfig:
    """The resolved job: everything a run needs, nothing read from argv or the environment later."""

    model: ModelArgs
    data: DataArgs
    train: TrainArgs
