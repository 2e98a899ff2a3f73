"""The config tree: one dataclass per stage, parsed from the command line or a YAML/JSON file.

User-facing flags stay flat and keep the fms-hf-tuning and Hugging Face names (``--learning_rate``,
``--response_template``); the grouping into dataclasses is internal. Field docstrings are the ``--help``
text.
"""

from __future__ import annotations

import json
import re
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, Literal

from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.training_args import OptimizerNames

from tuning.config.fms import FmsArgs
from tuning.config.rules import check_values
from tuning.dtypes import DTYPE_NAMES
from tuning.errors import UserError

DataFormat = Literal[
    "auto", "pretokenized", "text", "template", "input_output", "prompt_completion", "alpaca", "chat"
]
TrainOn = Literal["responses", "last_response", "all"]
MasterWeights = Literal["auto", "float32", "kahan", "half"]
# --optim values whose update --master_weights kahan replaces by its Kahan-compensated AdamW (same algorithm)
KAHAN_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


def unescape(text: str | None) -> str | None:
    r"""Turn the escapes a shell passes through literally (``\n``, ``\t``, ``\r``, ``\\``) into characters.

    Only these four: ``str.encode().decode("unicode_escape")`` would mangle non-ASCII templates.
    """
    if text is None:
        return None
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda m: table[m.group(1)], text)


def json_object(value: dict | str | None, flag: str, example: str) -> dict | None:
    """A flag's JSON object, given as text on the command line or as a mapping in a config file."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--{flag} is not valid JSON: {e}") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"--{flag} must be a JSON object, e.g. {example}")
    return value


@cache
def text_fields(cls: type) -> tuple[str, ...]:
    """Our own free-text and list-of-text fields of ``cls`` (not Hugging Face's TrainingArguments', not
    those with choices), where an empty value means nothing: an empty ``--response_template`` would match
    everywhere."""
    hints = typing.get_type_hints(cls)
    inherited = {f.name for f in fields(TrainingArguments)}
    text_types = (str, str | None, list[str], list[str] | None)
    return tuple(
        f.name
        for f in fields(cls)
        if f.name not in inherited and hints[f.name] in text_types and "choices" not in f.metadata
    )


@cache
def float_fields(cls: type) -> frozenset[str]:
    hints = typing.get_type_hints(cls)
    return frozenset(n for n, h in hints.items() if h is float or h == float | None)


@cache
def literal_choices(cls: type) -> dict[str, tuple]:
    """Fields of ``cls`` typed ``Literal[...]`` (or an Optional one) → their choices."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        literal = next((a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is Literal), None)
        if literal is not None:
            out[name] = typing.get_args(literal)
    return out


def check_group(group: Any) -> None:
    """The value rules (tuning/config/rules.py) and Literal choices for an argument group, however it
    was built (the parser has checked both already, saying where each value came from)."""
    cls = type(group)
    for name, choices in literal_choices(cls).items():
        value = getattr(group, name)
        if value is not None and value not in choices:
            raise UserError(f"--{name} is {value!r}: choose one of {', '.join(map(str, choices))}")
    check_values(vars(group), text_fields(cls), floats=float_fields(cls))


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
            "help": "Weights dtype: bfloat16 (default), float16, float32 or auto (the checkpoint's). How "
            "trainable weights keep precision in half precision is --master_weights.",
            "choices": list(DTYPE_NAMES),
        },
    )
    master_weights: MasterWeights = field(
        default="auto",
        metadata={
            "help": "How trainable weights keep precision under a half --torch_dtype (docs/memory.md). "
            "float32: float32 weights and AdamW state, compute under autocast (16 bytes per parameter); "
            "kahan: bfloat16 weights and AdamW state with Kahan-compensated updates (torch-optimi), "
            "10 bytes per parameter, learns like float32; half: plain torch_dtype weights and optimizer "
            "(8 bytes; small updates vanish at lr 1e-5). auto: kahan for full fine-tuning in bfloat16 "
            "with an AdamW --optim, float32 otherwise (adapters, float16, other optimizers)."
        },
    )
    half_precision_master_weights: bool = field(
        default=False,
        metadata={"help": "Same as --master_weights half (kept for existing commands)."},
    )
    use_flash_attn: bool = field(
        default=True, metadata={"help": "Ask for flash_attn_implementation; false asks for sdpa."}
    )
    flash_attn_implementation: str = field(
        default="flash_attention_2",
        metadata={
            "help": "Attention kernel when use_flash_attn: flash_attention_2, flash_attention_3, sdpa, "
            "eager, or a hub kernel id (kernels-community/...). When it can't run here: the model's own "
            "flash kernel (gpt-oss), flash_attention_2, sdpa, eager, as the model allows; one warning."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model repo's own code."})
    freeze_vision_tower: bool = field(
        default=True,
        metadata={
            "help": "Image-text models: keep the vision encoder's weights frozen (LLaMA-Factory's name; "
            "false trains it too, in full or with LoRA). docs/vision.md."
        },
    )
    freeze_multi_modal_projector: bool = field(
        default=True,
        metadata={"help": "Image-text models: keep the projector from image features to text frozen."},
    )

    def __post_init__(self) -> None:
        check_group(self)
        if self.half_precision_master_weights:
            if self.master_weights not in ("auto", "half"):
                raise ValueError(
                    f"--half_precision_master_weights means --master_weights half, but --master_weights is "
                    f"{self.master_weights}; pass one of them"
                )
            self.master_weights = "half"
        if self.master_weights == "kahan" and self.torch_dtype in ("float16", "float32"):
            raise ValueError(
                f"--master_weights kahan keeps bfloat16 weights, not --torch_dtype {self.torch_dtype}; pass "
                "--torch_dtype bfloat16 (float16 trains with --master_weights float32: it needs loss scaling)"
            )


@dataclass
class DataArgs:
    training_data_path: str | None = field(
        default=None,
        metadata={"help": "Training data: .json/.jsonl/.parquet/.arrow/.csv file, folder, glob or hub id."},
    )
    validation_data_path: str | None = field(default=None, metadata={"help": "Validation data, same forms."})
    data_config_path: str | None = field(
        default=None,
        metadata={
            "help": "YAML/JSON data config (several datasets, named handlers, mixing, splits) instead of "
            "--training_data_path; see docs/data_config.md."
        },
    )
    do_dataprocessing_only: bool = field(
        default=False,
        metadata={
            "help": "Write the processed train/validation sets as parquet shards to output_dir and exit."
        },
    )
    num_train_dataset_shards: int = field(
        default=1, metadata={"help": "Parquet shards for the train set with --do_dataprocessing_only."}
    )
    num_eval_dataset_shards: int = field(
        default=1, metadata={"help": "Parquet shards for the validation set with --do_dataprocessing_only."}
    )
    data_format: DataFormat = field(
        default="auto",
        metadata={
            "help": "How rows become tokens. auto picks by the rule in docs/data.md: template flag, "
            "text-field flag, conversation flag, then the columns (input_ids, messages/conversations, "
            "prompt+completion, instruction+output, input+output, text)."
        },
    )
    train_on: TrainOn = field(
        default="responses",
        metadata={
            "help": "What carries loss. responses (default): every assistant turn of chat data (as the "
            "model generates it), the completion/output column, the text after --response_template; "
            "last_response: only the last of those; all: every token of the text.",
        },
    )
    assistant_only_loss: bool | None = field(
        default=None,
        metadata={"help": "TRL's name: true is --train_on responses, false is --train_on all."},
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "TRL's name: true is --train_on responses, false is --train_on all."},
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
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "A chat template file (.jinja), or a tokenizer folder whose template to use, instead of "
            "the tokenizer's (TRL's name)."
        },
    )
    chat_template_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": 'JSON object of extra chat template variables, e.g. {"enable_thinking": false} or '
            '{"reasoning_effort": "high"}; a row\'s chat_template_kwargs column overrides it.'
        },
    )
    chat_render_budget: int = field(
        default=4_000_000,
        metadata={
            "help": "Characters the chat template may render per conversation to find each assistant "
            "turn's context (quadratic in turns); later turns beyond it are left untrained and counted."
        },
    )
    max_dropped_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Data audit gate: stop before training (exit 1) when a source drops more than this "
            "fraction of its rows. Unset: warn above 0.1 (docs/data.md, Audit)."
        },
    )
    max_truncated_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Data audit gate: stop when more than this fraction of a source's samples are truncated "
            "at max_seq_length. Unset: warn above 0.1."
        },
    )
    min_trained_tokens_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Data audit gate: stop when a source's trained tokens are less than this fraction of "
            "its tokens. Unset: warn below 0.02."
        },
    )
    max_duplicate_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Data audit gate: stop when more than this fraction of a source's samples repeat an "
            "earlier one exactly. Unset: warn above 0.1."
        },
    )
    max_empty_trained_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Data audit gate: stop when more than this fraction of a source's samples train an "
            "empty or whitespace text. Unset: warn above 0.05, and stop when every sample of a source is "
            "empty (pass 1 to train anyway)."
        },
    )
    audit_samples: int = field(
        default=3, metadata={"help": "Samples per source shown on the data audit page (data_audit.html)."}
    )
    dataset_conversation_field: str | None = field(
        default=None, metadata={"help": "Column with a list of chat messages (default: messages)."}
    )
    dataset_image_field: str | None = field(
        default=None,
        metadata={
            "help": "Column with each row's images (fms-hf-tuning's name; default: images, then image): one "
            'image per {"type": "image"} item or <image> marker, in order, as paths (relative to the data '
            "file's folder), {bytes} or a single image; needs an image-text model (docs/vision.md)."
        },
    )
    add_special_tokens: list[str] | None = field(
        default=None,
        metadata={"help": "New special tokens to add to the tokenizer (embeddings are resized)."},
    )
    max_seq_length: int = field(
        default=4096,
        metadata={
            "help": "Longest sample in tokens (capped by the model's context).",
            "aliases": ["--max_length"],
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack the training samples into rows of up to max_seq_length tokens (fewer, fuller "
            "rows); --packing_strategy says how."
        },
    )
    packing_strategy: Literal["bfd", "wrapped"] = field(
        default="bfd",
        metadata={
            "help": "bfd (default, TRL's): whole samples by best-fit decreasing, position_ids restarting per "
            "sample, so no sample attends to another and the loss equals unpacked training (needs "
            "padding-free batches). wrapped: pretraining-style, everything concatenated and cut every "
            "max_seq_length tokens; samples in a row attend to each other and may be split.",
            "choices": ["bfd", "wrapped"],
        },
    )

    def __post_init__(self) -> None:
        self.response_template = unescape(self.response_template)
        self.instruction_template = unescape(self.instruction_template)
        self.data_formatter_template = unescape(self.data_formatter_template)
        self.chat_template_kwargs = json_object(
            self.chat_template_kwargs, "chat_template_kwargs", '{"enable_thinking": false}'
        )
        if self.chat_template and self.chat_template_path:
            raise ValueError("pass either --chat_template or --chat_template_path, not both")
        # TRL's switches: false trains every token, true is our default (a conflict is an error)
        for name in ("assistant_only_loss", "completion_only_loss"):
            value = getattr(self, name)
            if value is None:
                continue
            if (self.train_on == "all") if value else (self.train_on == "last_response"):
                raise ValueError(f"--{name} {str(value).lower()} contradicts --train_on {self.train_on}")
            if not value:
                self.train_on = "all"
        check_group(self)


# The established defaults of the fms-hf-tuning family, which differ from Hugging Face's own.
@dataclass
class TrainArgs(TrainingArguments):
    # retyped as str for the new defaults: the choices transformers derives from its enums are restated
    save_strategy: str = field(
        default="epoch",
        metadata={"help": "no | steps | epoch | best", "choices": [s.value for s in SaveStrategy]},
    )
    logging_strategy: str = field(
        default="epoch",
        metadata={"help": "no | steps | epoch", "choices": [s.value for s in IntervalStrategy]},
    )
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Hugging Face integrations to report to (default none)."}
    )
    # Hugging Face's own default since torch 2.8: one fused kernel per tensor instead of a dozen passes
    # (10x faster on CPU). fms-hf-tuning's default adamw_torch gives the same losses, only slower.
    optim: str = field(
        default="adamw_torch_fused",
        metadata={
            "help": "Optimizer (default adamw_torch_fused: torch's AdamW, fused kernel).",
            "choices": [o.value for o in OptimizerNames],
        },
    )
    save_model_dir: str | None = field(
        default=None,
        metadata={"help": "Where the final model goes (safetensors + config + tokenizer)."},
    )
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio); the fms-hf-tuning
    # family's commands still pass --warmup_ratio, so it stays a flag of its own.
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Linear warmup over this fraction of the total steps."}
    )
    disable_tqdm: bool = field(
        default=False,
        metadata={
            "help": "No progress bars: plain progress lines on a terminal too, and no library bars (loading "
            "weights, writing shards). Where stderr is not a terminal there are never bars."
        },
    )
    # transformers 5 dropped this flag; fms-hf-tuning's job files (its README's, its tests') still set it
    include_tokens_per_second: bool = field(
        default=False,
        metadata={
            "help": "Accepted for compatibility (transformers 4): trained tokens/s is always in the progress "
            "lines and run_summary.json."
        },
    )
    # transformers 5's JIT checkpoint saves on SIGTERM; that is always on here (tuning/train/signals.py)
    enable_jit_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Accepted for compatibility; always on here: SIGTERM (or SIGINT) finishes the current "
            "step, commits a checkpoint and exits 143 (130); rerunning resumes (docs/checkpoints.md)."
        },
    )
    # speed and memory (docs/performance.md)
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "Concatenate each batch into one row with position_ids restarting per sample: no "
            "padding, no cross-sample attention. On where exact; --padding_free false pads instead."
        },
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Form each batch by a token budget (samples of similar length together) instead of "
            "per_device_train_batch_size samples."
        },
    )
    # several machines (docs/distributed.md)
    process_data_once_per: Literal["node", "job"] = field(
        default="node",
        metadata={
            "help": "Across machines, who loads and tokenizes the data while the other ranks wait and then "
            "read the datasets cache: node = one process per machine (right when each machine has its own "
            "cache, the default ~/.cache); job = one process in all (the cache, HF_DATASETS_CACHE, is on "
            "storage every machine shares)."
        },
    )
    wait_for_output_dir: float = field(
        default=300.0,
        metadata={
            "help": "Seconds to wait when another run holds --output_dir (e.g. a pod still saving after "
            "SIGTERM) before exiting 1; 0 exits at once. See docs/checkpoints.md."
        },
    )
    loss_implementation: Literal["auto", "label_only", "standard"] = field(
        default="auto",
        metadata={
            "help": "label_only: logits and cross-entropy only at trained positions, in chunks (exact); "
            "standard: the model's own loss over full logits; auto: label_only where it applies."
        },
    )
    activation_offloading: bool = field(
        default=False,
        metadata={
            "help": "Move the activations saved for backward to host memory during forward and back for "
            "backward (torch.autograd.graph.save_on_cpu; TRL's and axolotl's flag). With "
            "--gradient_checkpointing only the layer inputs checkpointing keeps are moved. Saves device "
            "memory for host memory and transfer time; the loss is unchanged."
        },
    )
    oom_recovery: bool | None = field(
        default=None,
        metadata={
            "help": "When a micro-batch runs out of device memory, split it by tokens and redo the step "
            "(the update equals the unsplit one's); exit 1 naming the sample when one sample alone does "
            "not fit. Default: on with CUDA. With several processes every rank stops together with exit 1 and "
            "one line instead of hanging (docs/performance.md)."
        },
    )
    memory_check: Literal["error", "warn", "off"] = field(
        default="error",
        metadata={
            "help": "Before the model loads, print the per-device memory plan (docs/memory.md). error: when "
            "it exceeds the device's memory, stop (exit 1) naming flags that would fit; warn: say so and go "
            "on; off: no plan."
        },
    )
    # what a run shows about quality (docs/training.md): generations, early stopping, the serve check
    eval_generations: int = field(
        default=0,
        metadata={
            "help": "At each evaluation, greedily generate the assistant turn for this many fixed validation "
            "prompts into output_dir/eval_generations.jsonl and the trackers (axolotl: eval_table_size).",
            "aliases": ["--eval_table_size"],
        },
    )
    eval_max_new_tokens: int = field(
        default=128,
        metadata={
            "help": "Most tokens each --eval_generations answer may have (axolotl: eval_max_new_tokens).",
            "aliases": ["--eval_table_max_new_tokens"],
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many evaluations in a row without metric_for_best_model (default "
            "validation loss) improving by more than --early_stopping_threshold; the best checkpoint is kept."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0,
        metadata={"help": "How much metric_for_best_model must improve to reset --early_stopping_patience."},
    )
    serve_check: Literal["warn", "error", "off"] = field(
        default="warn",
        metadata={
            "help": "After the final save, reload the saved model, tokenizer, chat template and "
            "generation_config as a server does and check they reproduce the trained tokens and stop where "
            "training ended turns. warn: a mismatch is a warning; error: exit 1; off: no check."
        },
    )

    @property
    def optim_name(self) -> str:
        """``--optim`` as its plain name (TrainingArguments turns it into an enum)."""
        return str(getattr(self.optim, "value", self.optim))

    def __post_init__(self) -> None:
        check_group(self)
        if self.early_stopping_patience and self.metric_for_best_model is None:
            self.metric_for_best_model = "eval_loss"  # before HF derives greater_is_better from it
        if self.warmup_ratio is not None:
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
    peft: PeftArgs = field(default_factory=lambda: PeftArgs())  # defined below; the lambda defers the lookup
    trackers: TrackerArgs = field(default_factory=lambda: TrackerArgs())
    quant: QuantArgs = field(default_factory=lambda: QuantArgs())
    fms: FmsArgs = field(default_factory=FmsArgs)


PeftMethod = Literal["none", "lora", "alora", "pt"]


@dataclass
class PeftArgs:
    """Parameter-efficient fine-tuning. Field names are ``peft.LoraConfig``'s (``lora_r`` is its ``r``)."""

    peft_method: PeftMethod = field(
        default="none",
        metadata={"help": "none (full fine-tuning), lora, alora (activated LoRA) or pt (prompt tuning)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank.", "aliases": ["--r"]})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt (suffixes such as q_proj v_proj), or all-linear: every linear "
            "layer except the output head (name lm_head as well to include it). Default: peft's choice "
            "for the architecture."
        },
    )
    exclude_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names never to adapt, even when a target matches them."}
    )
    target_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "Parameters (not modules) to adapt, e.g. the experts of a mixture-of-experts."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved in the adapter (e.g. score)."}
    )
    bias: Literal["none", "all", "lora_only"] = field(
        default="none", metadata={"help": "Which biases train: none, all, or lora_only."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha / sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    init_lora_weights: str = field(
        default="true",
        metadata={
            "help": "true (B=0, the adapter starts as a no-op), false, gaussian, pissa, olora, orthogonal, "
            "or another peft init name."
        },
    )
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    lora_bias: bool = field(default=False, metadata={"help": "Give the LoRA B matrix a bias."})
    alora_invocation_string: str | None = field(
        default=None,
        metadata={
            "help": "alora: the text (e.g. '<|assistant|>') after which the adapter switches on; its "
            "tokens must appear in every training sample."
        },
    )
    num_virtual_tokens: int = field(default=8, metadata={"help": "pt: number of soft prompt tokens."})
    prompt_tuning_init: Literal["RANDOM", "TEXT"] = field(
        default="RANDOM", metadata={"help": "pt: initialise the soft prompt randomly or from text."}
    )
    prompt_tuning_init_text: str | None = field(
        default=None, metadata={"help": "pt with --prompt_tuning_init TEXT: the text to start from."}
    )
    embedding_size_multiple_of: int = field(
        default=1,
        metadata={
            "help": "With --add_special_tokens on an adapter: round the resized vocabulary up to a "
            "multiple of this (64 suits tensor cores)."
        },
    )
    lora_config_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": 'JSON object of further peft.LoraConfig keywords, e.g. {"fan_in_fan_out": true} (fms-hf-tuning '
            "job files' other LoraConfig keys land here)."
        },
    )
    save_new_embeddings_separately: bool = field(
        default=False,
        metadata={
            "help": "With added tokens: write the new embedding rows to new_embeddings.safetensors next to "
            "an adapter without them (for vLLM releases before Nov 2025; current vLLM takes no new "
            "vocabulary in an adapter: serve the model from tuning merge instead)."
        },
    )

    def __post_init__(self) -> None:
        self.alora_invocation_string = unescape(self.alora_invocation_string)
        self.lora_config_kwargs = json_object(
            self.lora_config_kwargs, "lora_config_kwargs", '{"fan_in_fan_out": true}'
        )
        own = sorted(
            set(self.lora_config_kwargs or {}) & {"r", "lora_alpha", "lora_dropout", "target_modules"}
        )
        if own:
            raise ValueError(f"--lora_config_kwargs sets {', '.join(own)}: pass them as flags (--lora_r ...)")
        check_group(self)
        if self.peft_method == "alora" and not self.alora_invocation_string:
            raise ValueError(
                "--peft_method alora needs --alora_invocation_string (the text that activates it)"
            )
        if (
            self.peft_method == "pt"
            and self.prompt_tuning_init == "TEXT"
            and not self.prompt_tuning_init_text
        ):
            raise ValueError("--prompt_tuning_init TEXT needs --prompt_tuning_init_text")


TRACKERS = (
    "file_logger",
    "aim",
    "tensorboard",
    "mlflow",
    "wandb",
    "clearml",
    "trackio",
    "hf_resource_scanner",
)


@dataclass
class TrackerArgs:
    """Experiment trackers (docs/tracking.md). ``file_logger`` (training_logs.jsonl) is always on."""

    trackers: list[str] = field(
        default_factory=lambda: ["file_logger"],
        metadata={
            "help": "file_logger (always on), aim, tensorboard, mlflow, wandb, clearml, trackio, "
            "hf_resource_scanner; several as separate values or comma-separated (--tracker aim,wandb).",
            "choices": TRACKERS,
        },
    )
    experiment: str | None = field(
        default=None, metadata={"help": "Experiment name in the trackers (default: the output_dir name)."}
    )
    aim_repo: str | None = field(
        default=None, metadata={"help": "aim repository folder (default: output_dir)."}
    )
    aim_remote_server_ip: str | None = field(
        default=None, metadata={"help": "aim remote tracking server host (instead of --aim_repo)."}
    )
    aim_remote_server_port: int | None = field(
        default=None, metadata={"help": "aim remote tracking server port (default 53800)."}
    )
    mlflow_tracking_uri: str | None = field(
        default=None, metadata={"help": "MLflow tracking URI (default: sqlite:///OUTPUT_DIR/mlflow.db)."}
    )
    mlflow_experiment: str | None = field(
        default=None, metadata={"help": "MLflow experiment name (default: --experiment)."}
    )
    exp_metadata: dict | str | None = field(
        default=None, metadata={"help": 'JSON object recorded as run parameters, e.g. {"team": "nlp"}.'}
    )
    # fms-hf-tuning's tracker keys (its TrackerConfigs)
    aim_experiment: str | None = field(
        default=None, metadata={"help": "aim experiment name (default: --experiment)."}
    )
    aim_url: str | None = field(
        default=None, metadata={"help": "aim remote repository URL, aim://HOST:PORT (instead of --aim_repo)."}
    )
    clearml_project: str | None = field(
        default=None, metadata={"help": "ClearML project (default: --experiment)."}
    )
    clearml_task: str | None = field(
        default=None, metadata={"help": "ClearML task name (default: the run name)."}
    )
    wandb_project: str | None = field(
        default=None, metadata={"help": "W&B project (default: $WANDB_PROJECT, else --experiment)."}
    )
    trackio_project: str | None = field(
        default=None, metadata={"help": "trackio project (default: --experiment)."}
    )
    scanner_output_filename: str = field(
        default="scanner_output.json",
        metadata={"help": "hf_resource_scanner: its report file, in output_dir (fms-hf-tuning's default)."},
    )
    training_logs_filename: str = field(
        default="training_logs.jsonl",
        metadata={
            "help": "file_logger's file name in output_dir (fms-hf-tuning's key; default training_logs.jsonl)."
        },
    )
    run_uri_export_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder for a copy of each <tracker>_tracker.json (fms-hf-tuning's key; always in output_dir)."
        },
    )
    tensorboard_dir: str | None = field(
        default=None,
        metadata={
            "help": "TensorBoard event folder (default: $TENSORBOARD_LOGGING_DIR, else output_dir/tensorboard); "
            "transformers 4's --logging_dir means this."
        },
    )

    def __post_init__(self) -> None:
        check_group(self)
        self.trackers = list(dict.fromkeys(["file_logger", *self.trackers]))
        self.exp_metadata = json_object(self.exp_metadata, "exp_metadata", '{"team": "nlp"}')


QuantizationMethod = Literal["none", "mxfp4", "bnb_4bit", "bnb_8bit"]
BNB_METHODS = ("bnb_4bit", "bnb_8bit")


@dataclass
class QuantArgs:
    """Quantized weights: MXFP4 checkpoints (docs/gpt-oss.md) and bitsandbytes QLoRA (docs/memory.md).

    QLoRA is one mode, ``--quantization_method bnb_4bit`` (or ``bnb_8bit``); TRL's ``--load_in_4bit`` /
    ``--load_in_8bit`` and fms-hf-tuning's ``--bnb_qlora QUANT_TYPE`` name the same mode. They are resolved
    here, once: aliases that agree are one request, aliases that disagree are an error.
    """

    quantization_method: QuantizationMethod = field(
        default="none",
        metadata={
            "help": "mxfp4: the checkpoint's expert weights are MXFP4 (openai/gpt-oss-*); an MXFP4 "
            "checkpoint is treated this way even without the flag. bnb_4bit / bnb_8bit: QLoRA, the frozen "
            "base is quantized to 4 (NF4/FP4) or 8 bits by bitsandbytes while loading and LoRA adapters "
            "train on top (needs --peft_method lora and pip install 'tuning[bitsandbytes]')."
        },
    )
    dequantize: bool = field(
        default=True,
        metadata={
            "help": "Expand MXFP4 weights to torch_dtype on load and train them like any model (true, "
            "default). false keeps MXFP4, which needs a Hopper-class GPU and an adapter."
        },
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] | None = field(
        default=None, metadata={"help": "bnb_4bit: the 4-bit data type, nf4 (default, QLoRA's) or fp4."}
    )
    use_bnb_nested_quant: bool = field(
        default=True,
        metadata={
            "help": "bnb_4bit: double quantization (the per-block scales are quantized too: 4.13 instead "
            "of 4.5 bits per weight). Default true, as QLoRA and fms-hf-tuning; TRL defaults to false.",
            "aliases": ["--bnb_4bit_use_double_quant"],
        },
    )
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] | None = field(
        default=None,
        metadata={"help": "bnb_4bit: the dtype the dequantized weights compute in (default: torch_dtype)."},
    )
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] | None = field(
        default=None,
        metadata={
            "help": "bnb_4bit: the dtype the packed 4-bit weights are stored as; default uint8, or torch_dtype "
            "under FSDP (which shards every parameter of a layer in one dtype)."
        },
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "TRL's name for --quantization_method bnb_4bit."}
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "TRL's name for --quantization_method bnb_8bit."}
    )
    bnb_qlora: list[str] | None = field(
        default=None,
        metadata={
            "help": "fms-hf-tuning's name for --quantization_method bnb_4bit: QUANT_TYPE (nf4 or fp4) "
            "[NO_PEFT_MODEL] (the second value is accepted and has no effect: the adapter stage always wraps)."
        },
    )

    def __post_init__(self) -> None:
        check_group(self)
        named = (
            {"--quantization_method": self.quantization_method} if self.quantization_method != "none" else {}
        )
        if self.load_in_4bit:
            named["--load_in_4bit"] = "bnb_4bit"
        if self.load_in_8bit:
            named["--load_in_8bit"] = "bnb_8bit"
        quant_types = {"--bnb_4bit_quant_type": self.bnb_4bit_quant_type} if self.bnb_4bit_quant_type else {}
        if self.bnb_qlora is not None:
            named["--bnb_qlora"] = "bnb_4bit"
            quant_types["--bnb_qlora"] = _fms_quant_type(self.bnb_qlora)
        _one_value(named, "quantization modes")
        _one_value(quant_types, "4-bit types")
        self.quantization_method = next(iter(named.values()), "none")
        self.load_in_4bit = self.quantization_method == "bnb_4bit"
        self.load_in_8bit = self.quantization_method == "bnb_8bit"
        self.bnb_4bit_quant_type = next(iter(quant_types.values()), "nf4")


def _fms_quant_type(values: list[str]) -> str:
    """fms-hf-tuning's ``--bnb_qlora QUANT_TYPE [NO_PEFT_MODEL]`` (its BNBQLoraConfig fields, positionally)."""
    if not 1 <= len(values) <= 2 or values[0] not in ("nf4", "fp4"):
        raise ValueError(f"--bnb_qlora takes QUANT_TYPE (nf4 or fp4) [NO_PEFT_MODEL], got {' '.join(values)}")
    if len(values) == 2 and values[1].lower() not in ("true", "false"):
        raise ValueError(f"--bnb_qlora NO_PEFT_MODEL must be true or false, got {values[1]}")
    return values[0]


def _one_value(named: dict[str, str], what: str) -> None:
    """Several flags naming ``what`` must name the same one."""
    if len(set(named.values())) > 1:
        given = ", ".join(f"{flag} ({value})" for flag, value in named.items())
        raise ValueError(f"{given} name different {what}; pass one of them")
