"""Model stage: tokenizer and model loading, precision, attention, quantization, adapters, the memory plan."""

from tuning.model.decisions import (
    LABEL_ONLY_CHUNK_TOKENS,
    VERIFIED_ARCHITECTURES,
    LossDecision,
    Topology,
    causal_lm,
    decide_loss,
    label_only_blocker,
    padding_free_blocker,
    padding_free_decision,
    topology_of,
)
from tuning.model.encoding import Encoding, load_encoding
from tuning.model.loading import (
    PrecisionPlan,
    context_length,
    generation_use_cache,
    load_model,
    load_model_config,
    precision_plan,
)
from tuning.model.memory import estimate, setup_for
from tuning.model.memory_check import (
    GPU_RUNTIME_RESERVE,
    Capacity,
    check_fits,
    check_memory,
    device_capacity,
    gib,
    gpu_capacity,
    parse_size,
    render,
)
from tuning.model.peft import (
    ADDED_TOKENS_INFO_NAME,
    NEW_EMBEDDING_KEYS,
    NEW_EMBEDDINGS_NAME,
    apply_peft,
    write_adapter_extras,
)
from tuning.model.quantization import quantization_config
from tuning.model.tokenizer import generation_stop_ids, load_tokenizer
from tuning.model.vision import (
    is_image_text,
    load_processor,
    model_auto_class,
    processor_from,
    save_processor,
)

__all__ = [
    "Encoding",
    "load_encoding",
    "LABEL_ONLY_CHUNK_TOKENS",
    "VERIFIED_ARCHITECTURES",
    "LossDecision",
    "causal_lm",
    "decide_loss",
    "label_only_blocker",
    "padding_free_blocker",
    "padding_free_decision",
    "topology_of",
    "GPU_RUNTIME_RESERVE",
    "Capacity",
    "Topology",
    "check_fits",
    "check_memory",
    "device_capacity",
    "estimate",
    "gib",
    "gpu_capacity",
    "parse_size",
    "render",
    "setup_for",
    "ADDED_TOKENS_INFO_NAME",
    "NEW_EMBEDDINGS_NAME",
    "NEW_EMBEDDING_KEYS",
    "PrecisionPlan",
    "apply_peft",
    "context_length",
    "generation_stop_ids",
    "generation_use_cache",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "precision_plan",
    "quantization_config",
    "write_adapter_extras",
    "is_image_text",
    "load_processor",
    "model_auto_class",
    "processor_from",
    "save_processor",
]
