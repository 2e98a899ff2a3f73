"""The memory plan: what one device will hold during training, estimated before any weight is read.

The model is built on the meta device from its config (shapes and dtypes, no storage), quantized and
wrapped the way the run will do it (transformers' bitsandbytes module rule, peft's adapter on the same
targets), and every parameter is counted in the bytes its mode stores it in. Activations come from
the decoder layer's saved tensors, counted per token (see :func:`layer_activation_bytes`; the counts are
the tensors autograd keeps for a Llama-family block, checked against a real layer in tests/test_memory.py).

Peak memory is the larger of two moments: the forward/backward pass (weights and optimizer state, plus
the larger of the activations with logits and the gradients, or both when gradients accumulate over
micro-batches) and the optimizer step (weights, state, gradients and the step's temporaries).
docs/memory.md has the arithmetic for Llama-2-7B, Llama-3-70B and gpt-oss-120b, and benchmarks/RESULTS.md
compares the estimate with measured peaks.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from tuning.compat import transformers as hf
from tuning.config import BNB_METHODS, ModelArgs, PeftArgs, QuantArgs, SFTConfig
from tuning.errors import UserError, first_line
from tuning.model.decisions import (
    LABEL_ONLY_CHUNK_TOKENS,
    LossDecision,
    Topology,
    decide_loss,
    label_only_blocker,
    padding_free_blocker,
    padding_free_decision,
)
from tuning.model.loading import (
    PrecisionPlan,
    attention_candidates,
    causal_lm_class,
    model_refuses,
    why_unusable,
)
from tuning.model.peft import is_linear, wrap
from tuning.model.quantization import checkpoint_quant_method
from tuning.model.vision import freeze_vision, is_image_text, model_auto_class

logger = logging.getLogger(__name__)

GiB = 2**30
BNB_BLOCK = 64  # bitsandbytes 4-bit block size: one absmax per 64 weights
BNB_NESTED_BLOCK = 256  # double quantization: one float32 absmax per 256 first-level blocks
MXFP4_BLOCK = 32  # one E8M0 scale byte per 32 four-bit values


@dataclass(frozen=True)
class Workload:
    """What the activations depend on: the micro-batch each device runs."""

    batch_size: int = 1
    seq_len: int = 4096
    token_budget: int | None = None  # --max_tokens_per_batch
    gradient_checkpointing: bool = False
    activation_offloading: bool = False  # --activation_offloading: saved tensors wait in host memory
    padding_free: bool = True
    loss: str = "auto"  # --loss_implementation
    optim: str = "adamw_torch"
    accumulation: int = 1  # --gradient_accumulation_steps
    use_liger_kernel: bool = False
    label_smoothing_factor: float = 0.0
    packed: bool = False  # --packing_strategy bfd: rows hold several samples, kept apart padding-free

    @property
    def tokens(self) -> int:
        return self.token_budget or self.batch_size * self.seq_len


@dataclass(frozen=True)
class Setup:
    """Everything the estimate reads: the run's flags, resolved precision, and the model's config."""

    model_config: PretrainedConfig
    model: ModelArgs
    peft: PeftArgs
    quant: QuantArgs
    precision: PrecisionPlan
    workload: Workload
    topology: Topology = field(default_factory=Topology)
    vocab_size: int | None = None  # a tokenizer that grew past the config's vocabulary
    tokenizer: Any = None
    gpu: bool | None = None  # plan for a GPU (None: whatever this machine has)

    @property
    def on_gpu(self) -> bool:
        return torch.cuda.is_available() if self.gpu is None else self.gpu


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device. ``rows`` is the breakdown that :func:`render` prints."""

    parameters: int
    trainable: int
    weights: int
    adapter: int
    gradients: int
    optimizer: int
    autocast_copies: int
    gathered: int
    activations: int
    activations_checkpointed: int
    activations_full: int
    logits: int
    step_temporaries: int
    total: int
    describe: dict[str, str]
    decisions: dict[str, Any] = field(default_factory=dict)  # what the run decides the same way


# --- the model on the meta device ---


def meta_model(setup: Setup) -> tuple[Any, set[int]]:
    """The model with its run-time dtypes and adapters on the meta device (no memory, no weights read),
    and the ids of the weights bitsandbytes would quantize."""
    config = copy.deepcopy(setup.model_config)
    text = config.get_text_config()
    if setup.vocab_size and setup.vocab_size > text.vocab_size:
        text.vocab_size = setup.vocab_size
    config.use_cache = False  # as load_model sets it for training (padding-free batches read it)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # from_config must not quantize: stored bytes are counted below
    try:
        with torch.device("meta"):
            model = model_auto_class(config).from_config(
                config, dtype=setup.precision.load_dtype, trust_remote_code=setup.model.trust_remote_code
            )
    except Exception as e:  # noqa: BLE001 (any architecture transformers can't build from its config alone)
        raise UserError(
            f"memory plan: cannot build {config.model_type} from its config: {first_line(e)}"
        ) from None
    if is_image_text(config):  # the vision tower is counted; what the run freezes, the plan freezes
        freeze_vision(model, setup.model)
    quantized = {id(m.weight) for m in quantized_modules(model, setup.quant)}
    if setup.peft.peft_method != "none":  # the adapter stage's own wrapping, on the meta model
        model = wrap(setup.peft, model, setup.tokenizer, setup.precision)
    return model, quantized


def quantized_modules(model: Any, quant: QuantArgs) -> list[Any]:
    """The linear modules bitsandbytes replaces, by transformers' own rule (the output head and tied
    weights stay in the compute dtype)."""
    if quant.quantization_method not in BNB_METHODS:
        return []
    skip = HfQuantizer.get_modules_to_not_convert(model, None, hf.keep_in_fp32_modules(model))
    return [
        module
        for name, module in model.named_modules()
        if (type(module) is torch.nn.Linear or type(module).__name__ == "Conv1D")
        and should_convert_module(name, skip)
    ]


def bnb_bytes(numel: int, out_features: int, quant: QuantArgs) -> int:
    """Bytes of one bitsandbytes weight: packed values plus quantization constants (measured layout)."""
    if quant.quantization_method == "bnb_8bit":
        return numel + 4 * out_features  # int8 weights + one float32 scale per output row
    blocks = math.ceil(numel / BNB_BLOCK)
    if quant.use_bnb_nested_quant:  # absmax in uint8, one float32 per 256 blocks, two code tables
        constants = blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCK) + 4 * 256 + 4 * 16 + 4
    else:
        constants = 4 * blocks + 4 * 16
    return math.ceil(numel / 2) + constants


def keeps_mxfp4(setup: Setup) -> bool:
    return checkpoint_quant_method(setup.model_config) == "mxfp4" and not setup.quant.dequantize


@dataclass
class _Counts:
    parameters: int = 0
    trainable: int = 0
    weights: int = 0  # the model's weights as stored (frozen ones, and all of them in full fine-tuning)
    adapter: int = 0  # trainable weights an adapter added
    gradients: int = 0
    trainable_linear_fp32: int = 0  # trainable float32 weights autocast copies to the half dtype
    largest_layer: int = 0  # bytes of the largest decoder layer (an FSDP unit)
    root: int = 0  # bytes outside the decoder layers (embeddings, final norm, head): FSDP's root unit


def count_parameters(model: Any, quantized: set[int], setup: Setup) -> _Counts:
    counts = _Counts()
    mxfp4 = keeps_mxfp4(setup)
    adapters = setup.peft.peft_method != "none"
    linear = {id(m.weight) for m in model.modules() if is_linear(m)}
    layer_bytes: dict[str, int] = {}
    seen: set[int] = set()  # a tied weight (input embeddings = output head) is one tensor, stored once
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if id(param) in quantized:
                stored = bnb_bytes(param.numel(), param.shape[0], setup.quant)
            elif mxfp4 and type(module).__name__.endswith("Experts") and param.dim() == 3:
                stored = param.numel() // 2 + param.numel() // MXFP4_BLOCK  # 4-bit values + a scale per 32
            else:
                stored = param.numel() * param.element_size()
            counts.parameters += param.numel()
            if adapters and param.requires_grad:
                counts.adapter += stored
            else:
                counts.weights += stored
            if param.requires_grad:
                counts.trainable += param.numel()
                counts.gradients += param.numel() * param.element_size()
                if param.dtype == torch.float32 and id(param) in linear and setup.precision.autocast:
                    counts.trainable_linear_fp32 += param.numel()
            layer = _decoder_layer_of(f"{module_name}.{name}")
            if layer is None:
                counts.root += stored
            else:
                layer_bytes[layer] = layer_bytes.get(layer, 0) + stored
    counts.largest_layer = max(layer_bytes.values(), default=0)
    return counts


def _decoder_layer_of(name: str) -> str | None:
    """``model.layers.3`` for any parameter inside decoder layer 3 (None: outside the layers)."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return None


# --- optimizer state ---

# bytes of state per trainable parameter, for --optim names whose state does not follow the weights' dtype
_OPTIMIZER_STATE_BYTES = {
    "adamw_bnb_8bit": 2,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "adamw_torch_8bit": 2,
    "adamw_torch_4bit": 1,
    "ademamix_8bit": 3,
    "paged_ademamix_8bit": 3,
    "lion_8bit": 1,
    "paged_lion_8bit": 1,
    "paged_adamw_32bit": 8,
    "lion_32bit": 4,
    "paged_lion_32bit": 4,
    "ademamix": 12,
    "paged_ademamix_32bit": 12,
    "rmsprop_bnb_8bit": 1,
    "rmsprop_bnb_32bit": 4,
}
# state tensors per parameter in the parameter's own dtype
_OPTIMIZER_STATES = {"sgd": 0, "lomo": 0, "adalomo": 0, "adagrad": 1, "rmsprop": 1, "rmsprop_bnb": 1}


def optimizer_bytes(model: Any, setup: Setup) -> tuple[int, int, str]:
    """(state bytes, step temporaries, description) for the trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in trainable)
    optim = setup.workload.optim
    if setup.precision.master_weights == "kahan":
        size = trainable[0].element_size() if trainable else 2
        # two moments and the compensation buffer, in bfloat16; the step reuses the gradients as its buffer
        return 3 * size * numel, 0, f"Kahan AdamW: 2 moments + compensation, {3 * size} B/param"
    if optim == "adafactor":  # factored second moment: a row and a column vector per matrix
        state = sum(4 * (sum(p.shape[-2:]) if p.dim() >= 2 else p.numel()) for p in trainable)
        return state, 0, "Adafactor: factored second moment"
    if optim in _OPTIMIZER_STATE_BYTES:
        per = _OPTIMIZER_STATE_BYTES[optim]
        return per * numel, 0, f"{optim}: {per} B/param"
    states = _OPTIMIZER_STATES.get(optim, 2)
    state = states * sum(p.numel() * p.element_size() for p in trainable)
    # torch's AdamW on GPUs defaults to its foreach path, which materialises sqrt(v) for a whole dtype
    # group at once; fused and the CPU for-loop path need one tensor's worth
    foreach = optim == "adamw_torch" and setup.on_gpu
    largest = max((p.numel() * p.element_size() for p in trainable), default=0)
    temporaries = state // max(states, 1) if foreach else largest
    per = state / numel if numel else 0
    return state, temporaries, f"{optim}: {states} state tensors, {per:g} B/param"


# --- activations ---


def layer_activation_bytes(
    config: PretrainedConfig, tokens: int, compute: int, residual: int, frozen: bool = False
) -> int:
    """Bytes one decoder layer keeps for backward, for ``tokens`` tokens, with flash-style attention.

    Counted from the tensors autograd saves in a Llama-family block (RMSNorm, attention, gated MLP), per
    token, ``compute`` and ``residual`` being the bytes of the compute dtype and of the residual stream:

    - each RMSNorm keeps a float32 copy of its input (4h) and its float32 rsqrt (4); trainable norms and
      projections also keep the normalised input and its product with the weight (2 × compute·h); a float32
      residual under autocast keeps the float32 normalised input instead, and each of the five projections
      then casts its own copy of its input (5 × compute·h);
    - attention keeps rotated q and k, v and its output (compute · (2q + 2kv)) and a float32 log-sum-exp
      per head;
    - the gated MLP keeps the gate and up projections, the activation and their product (4 × compute·i);
      with a frozen MLP the product is not kept (its projection needs no input for its weight's gradient);
    - a mixture-of-experts layer keeps that MLP per active expert, the routed input and output of each
      (2 × compute·h) and the router's float32 logits.

    ``frozen``: an adapter run, where the base weights need no gradient; what adapters keep themselves is
    :func:`adapter_activation_bytes`. tests/test_memory.py checks every case against the tensors a real
    layer saves.
    """
    text = config.get_text_config()
    h = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    q = heads * head_dim
    kv = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    inter, experts = _mlp_width(text)
    rsqrt = 4
    if frozen:
        norms = 2 * (4 * h + rsqrt)
    elif compute == 4:  # float32 throughout: the input is the float32 copy; normalised and weighted outputs
        norms = 2 * (3 * 4 * h + rsqrt)
    elif residual == 4:  # float32 residual under autocast
        norms = 2 * (2 * 4 * h + rsqrt) + 5 * compute * h
    else:
        norms = 2 * (4 * h + rsqrt + 2 * compute * h)
    attention = compute * (2 * q + 2 * kv) + 4 * heads
    mlp = (3 if frozen else 4) * compute * inter
    if experts:
        total = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or experts
        mlp = experts * (mlp + 2 * compute * h) + 4 * total
    return tokens * (norms + attention + mlp)


def _mlp_width(text: Any) -> tuple[int, int]:
    """(intermediate size of one MLP, active experts per token; 0 for a dense model)."""
    experts = getattr(text, "num_experts_per_tok", None) or getattr(text, "experts_per_token", None) or 0
    moe = getattr(text, "moe_intermediate_size", None)
    return int(moe or text.intermediate_size), int(experts)


def attention_implementation(setup: Setup) -> str:
    """The kernel loading will pick first (the fallback chain of tuning/model/loading.py)."""
    model_class = causal_lm_class(setup.model_config)
    for impl in attention_candidates(setup.model, model_class):
        # planning for another machine's GPU: only what the model itself rules out counts
        refused = model_refuses(impl, model_class) if model_class else None
        usable = (
            refused is None
            if setup.gpu and not torch.cuda.is_available()
            else why_unusable(impl, model_class) is None
        )
        if usable:
            return impl
    return "eager"


def attention_score_bytes(setup: Setup, compute: int) -> tuple[int, int]:
    """(bytes per layer, bytes once) that an attention kernel materialises beyond q, k, v and its output.

    Flash kernels: nothing. sdpa: the boolean mask it is given (padding-free rows: one block-diagonal
    ``tokens²`` mask). eager: per layer the float32 softmax and its half-precision copy for every score,
    plus key/value heads repeated to the query heads (grouped-query attention), and an additive mask.
    """
    impl = attention_implementation(setup)
    w = setup.workload
    rows, length = (1, w.tokens) if w.padding_free else (max(w.tokens // w.seq_len, 1), w.seq_len)
    if impl.startswith("flash") or "/" in impl:
        return 0, 0
    if impl != "eager":
        return 0, rows * length * length
    text = setup.model_config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    repeated = 2 * compute * (heads - kv_heads) * head_dim * w.tokens if kv_heads != heads else 0
    return rows * heads * length * length * (4 + compute) + repeated, rows * length * length * compute


def logits_bytes(setup: Setup, compute: int, vocab: int, loss: LossDecision) -> tuple[int, str]:
    """The output head's logits and cross-entropy buffers at their peak (the start of the head's
    backward), per position and vocabulary entry: the float32 log-softmax kept for backward, the float32
    gradient arriving at it and the one it passes on (12 bytes); the logits themselves are not kept (the
    Trainer drops the model's outputs before backward, and label-only loss's chunk logits are a
    temporary of each chunk's loss, recomputed in backward). With half-precision logits the model's own
    loss holds one more half-precision buffer (14 bytes in bfloat16). Measured: RSS growth on CPU in
    float32 (12 bytes with either loss: tests/test_memory.py, docs/memory.md), torch's memory profiler in
    bfloat16 (12 label-only, 14 the model's own). Label-only loss (tuning/train/loss.py) holds this for
    at most one chunk of trained positions."""
    w = setup.workload
    if loss.loss == "standard":
        per = 12 + (compute if compute < 4 else 0)
        return per * vocab * w.tokens, f"logits of {w.tokens} tokens × {vocab} vocab ({loss.planned})"
    positions = min(w.tokens, LABEL_ONLY_CHUNK_TOKENS)
    return 12 * vocab * positions, f"logits of ≤ {positions} trained tokens × {vocab} vocab (label_only)"


def adapter_activation_bytes(model: Any, setup: Setup) -> int:
    """What LoRA adapters keep for backward per token, all layers together.

    peft casts each adapted module's input to the adapter's dtype and, with ``--lora_dropout``, drops
    out that copy: on GPUs dropout keeps a boolean mask (1 byte per value), on CPU a noise tensor in the
    input's dtype. ``lora_A`` keeps its own input in the compute dtype and ``lora_B`` the rank-r product.
    """
    if setup.peft.peft_method not in ("lora", "alora"):
        return 0
    compute = 4 if (setup.precision.autocast or setup.precision.load_dtype) == torch.float32 else 2
    per_token = 0
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if not lora_a or not hasattr(module, "in_features"):
            continue
        adapter = next(iter(lora_a.values()))
        width, rank = adapter.in_features, adapter.out_features
        per_token += compute * (width + rank)
        if setup.peft.lora_dropout > 0:
            per_token += (1 if setup.on_gpu else adapter.weight.element_size()) * width
    return per_token


# --- the plan ---


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs from the meta-device model (the slow part: built once per model variant)."""

    counts: _Counts
    state: int
    temporaries: int
    optimizer_note: str
    adapter_per_token: int
    model_type: str | None = None
    label_only_blocker: str | None = None  # tuning.model.decisions: the same questions the run asks
    padding_free_blocker: str | None = None


def model_facts(setup: Setup) -> ModelFacts:
    model, quantized = meta_model(setup)
    state, temporaries, note = optimizer_bytes(model, setup)
    counts = count_parameters(model, quantized, setup)
    return ModelFacts(
        counts,
        state,
        temporaries,
        note,
        adapter_activation_bytes(model, setup),
        model_type=getattr(setup.model_config, "model_type", None),
        label_only_blocker=label_only_blocker(model),
        padding_free_blocker=padding_free_blocker(model, attention_implementation(setup)),
    )


def decisions(setup: Setup, facts: ModelFacts) -> tuple[LossDecision, bool]:
    """(the loss, padding-free or not) as the run will decide them, from the meta model's facts."""
    w = setup.workload
    loss = decide_loss(
        w.loss,
        facts.model_type,
        facts.label_only_blocker,
        use_liger_kernel=w.use_liger_kernel,
        label_smoothing_factor=w.label_smoothing_factor,
    )
    return loss, padding_free_decision(w.padding_free, facts.padding_free_blocker, w.packed)


def estimate(setup: Setup, facts: ModelFacts | None = None) -> MemoryPlan:
    """The memory plan for one device (``facts``: the model's, when already counted for this variant)."""
    facts = facts or model_facts(setup)
    loss, padding_free = decisions(setup, facts)
    setup = replace(setup, workload=replace(setup.workload, padding_free=padding_free))
    counts, state, temporaries = facts.counts, facts.state, facts.temporaries
    precision, w, topo = setup.precision, setup.workload, setup.topology
    residual = 4 if precision.load_dtype == torch.float32 else 2
    compute = 4 if (precision.autocast or precision.load_dtype) == torch.float32 else 2
    text = setup.model_config.get_text_config()
    layers = text.num_hidden_layers
    frozen = setup.peft.peft_method != "none"
    per_layer = layer_activation_bytes(setup.model_config, w.tokens, compute, residual, frozen)
    per_layer += facts.adapter_per_token * w.tokens // max(layers, 1)
    scores, once = attention_score_bytes(setup, compute)
    logits, logits_note = logits_bytes(setup, compute, max(setup.vocab_size or 0, text.vocab_size), loss)
    full = layers * (per_layer + scores) + once
    # checkpointing keeps each layer's input and recomputes one layer at a time in backward
    checkpointed = layers * residual * text.hidden_size * w.tokens + per_layer + scores + once
    recompute = w.gradient_checkpointing or (topo.sharded and topo.activation_checkpointing)
    activations = checkpointed if recompute else full
    if w.activation_offloading:
        # save_on_cpu: what autograd keeps goes to host memory as it is saved; the device holds the layer
        # being computed (forward, or backward with its saved tensors brought back), not the stack of them
        activations = per_layer + scores + once
    # autocast keeps a half copy of every float32 weight it casts until the forward ends, and saves it
    # for backward; under checkpointing each layer casts again when it is recomputed
    copies = 2 * counts.trainable_linear_fp32
    if recompute:
        copies = min(copies, counts.largest_layer // 2)
    shard = topo.world_size if topo.sharded else 1
    weights, adapter = counts.weights // shard, counts.adapter // shard
    gradients, state, temporaries = counts.gradients // shard, state // shard, temporaries // shard
    if topo.sharded and topo.offload:  # only the gathered units come to the GPU
        weights = adapter = gradients = state = temporaries = 0
    # FSDP: the root unit (embeddings, head) stays gathered through the pass; one layer plus its prefetch
    gathered = counts.root + 2 * counts.largest_layer if shard > 1 else 0
    resident = weights + adapter + state + gathered
    # backward frees each layer's activations as it fills that layer's gradients, so one micro-batch
    # peaks at the larger of the two; accumulated gradients stay while the next micro-batch runs
    working = activations + logits + copies
    forward_backward = resident + (gradients + working if w.accumulation > 1 else max(working, gradients))
    step = resident + gradients + temporaries
    return MemoryPlan(
        parameters=counts.parameters,
        trainable=counts.trainable,
        weights=weights,
        adapter=adapter,
        gradients=gradients,
        optimizer=state,
        autocast_copies=copies,
        gathered=gathered,
        activations=activations,
        activations_checkpointed=checkpointed,
        activations_full=full,
        logits=logits,
        step_temporaries=temporaries,
        total=max(forward_backward, step),
        describe={
            "optimizer": facts.optimizer_note,
            "logits": logits_note,
            "attention": attention_implementation(setup),
        },
        decisions={
            "loss": loss.loss,
            "verify_loss": loss.verify,
            "padding_free": padding_free,
            "chunk_tokens": LABEL_ONLY_CHUNK_TOKENS,
            "world_size": topo.world_size,
            "engine": topo.engine,
            "sharded": topo.sharded,
        },
    )


def setup_for(
    config: SFTConfig,
    model_config: PretrainedConfig,
    precision: PrecisionPlan,
    topology: Topology,
    tokenizer: Any = None,
    max_len: int | None = None,
) -> Setup:
    """The estimate's inputs for a run's resolved config."""
    train = config.train
    packed = config.data.packing and config.data.packing_strategy == "bfd"
    workload = Workload(
        batch_size=train.per_device_train_batch_size,
        seq_len=max_len or config.data.max_seq_length,
        token_budget=train.max_tokens_per_batch,
        gradient_checkpointing=bool(train.gradient_checkpointing),
        activation_offloading=bool(train.activation_offloading),
        padding_free=train.padding_free,
        loss=train.loss_implementation,
        optim=train.optim_name,
        accumulation=train.gradient_accumulation_steps,
        use_liger_kernel=bool(train.use_liger_kernel),
        label_smoothing_factor=train.label_smoothing_factor,
        packed=packed,
    )
    return Setup(
        model_config=model_config,
        model=config.model,
        peft=config.peft,
        quant=config.quant,
        precision=precision,
        workload=workload,
        topology=topology,
        vocab_size=len(tokenizer) if tokenizer is not None else None,
        tokenizer=tokenizer,
    )
