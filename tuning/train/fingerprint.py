"""What a resumed run must share with the run that wrote its checkpoint, recorded in every checkpoint.

Hugging Face's Trainer resumes from any checkpoint and says nothing: with another batch size it skips
the wrong number of samples, with other data it continues on other rows, with another seed it
reshuffles, with another learning rate the scheduler's saved base rates silently win. Each "works" but
is no longer the run that was interrupted. So every checkpoint's marker records this fingerprint, and
the resume decision (``tuning/train/resume.py``) compares it with the new run's:

- **model**: parameter names, shapes and which are trainable (a digest), with a description for the
  message. A different model can't be resumed at all.
- **settings** that decide what each optimizer step computes: the effective batch (per-device size ×
  accumulation × processes: the same samples make each step when only its layout changes, e.g. twice
  the processes and half the accumulation), the token budget, the data (rows, tokens, a checksum of
  every ``input_ids`` and ``labels`` value and of their order as the Trainer sees them: after
  formatting, truncation to ``max_seq_length``, packing and mixing), the order (seed, data seed),
  precision, the optimizer and schedule, the adapter's scaling. Not the run's length (``--max_steps``
  may be raised to train longer), nor what it logs, evaluates or saves.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from tuning.compat import datasets as datasets_private
from tuning.config import SFTConfig

# flag → the config group holding it; a changed value makes the resumed run another run
SETTINGS: dict[str, str] = {
    "effective_batch": "",  # per device × accumulation × processes: how many samples make a step
    "max_tokens_per_batch": "train",
    "max_seq_length": "data",
    "packing": "data",
    "seed": "train",
    "data_seed": "train",
    "torch_dtype": "model",
    "half_precision_master_weights": "model",
    "optim": "train",
    "learning_rate": "train",
    "lr_scheduler_type": "train",
    "weight_decay": "train",
    "peft_method": "peft",
    "lora_alpha": "peft",
    "lora_dropout": "peft",
    "use_rslora": "peft",
    "use_dora": "peft",
}


def run_fingerprint(config: SFTConfig, model: Any, train_dataset: Any) -> dict[str, Any]:
    """The fingerprint of this run (JSON-able), computed once before training on every rank."""
    train = config.train
    layout = [train.per_device_train_batch_size, train.gradient_accumulation_steps, train.world_size]
    settings = {
        name: _plain(getattr(getattr(config, group), name)) for name, group in SETTINGS.items() if group
    }
    settings["effective_batch"] = layout[0] * layout[1] * layout[2]
    return {
        "model": model_fingerprint(model),
        "data": data_fingerprint(train_dataset),
        "settings": settings,
        "batch_layout": layout,
    }


def model_fingerprint(model: Any) -> dict[str, Any]:
    """Digest of every parameter's name, shape and trainability, and a line describing the model."""
    digest = hashlib.sha256()
    total = trainable = 0
    for name, param in model.named_parameters():
        shape = tuple(getattr(param, "ds_shape", None) or param.shape)  # DeepSpeed ZeRO-3 partitions
        numel = 1
        for n in shape:
            numel *= n
        total += numel
        trainable += numel if param.requires_grad else 0
        digest.update(f"{name}:{list(shape)}:{int(param.requires_grad)}\n".encode())
    return {"description": describe_model(model, total, trainable), "digest": digest.hexdigest()[:16]}


def describe_model(model: Any, total: int, trainable: int) -> str:
    """``llama (2 layers, hidden size 64, vocabulary 300): 43,776 parameters, 43,776 trainable``."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    facts = []
    if (layers := getattr(text, "num_hidden_layers", None)) is not None:
        facts.append(f"{layers} layers")
    if (hidden := getattr(text, "hidden_size", None)) is not None:
        facts.append(f"hidden size {hidden}")
    if (vocab := getattr(text, "vocab_size", None)) is not None:
        facts.append(f"vocabulary {vocab}")
    kind = getattr(config, "model_type", None) or type(model).__name__
    shape = f" ({', '.join(facts)})" if facts else ""
    return f"{kind}{shape}{_adapter_description(model)}: {total:,} parameters, {trainable:,} trainable"


def _adapter_description(model: Any) -> str:
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return ""
    config = next(iter(peft_config.values()))
    kind = str(getattr(config, "peft_type", "adapter")).split(".")[-1]
    rank = f" r={config.r}" if getattr(config, "r", None) else ""
    targets = getattr(config, "target_modules", None)
    on = f" on {', '.join(sorted(targets))}" if isinstance(targets, (set, list, tuple)) and targets else ""
    return f" with a {kind}{rank} adapter{on}"


def data_fingerprint(dataset: Any) -> dict[str, Any] | None:
    """Rows, tokens and a digest of every ``input_ids`` and ``labels`` value and of the row order; None
    for a streamed dataset (it can't be read twice).

    Reads the Arrow buffers behind the dataset directly, with CRC-32 (a checksum, not a cryptographic
    hash: this detects changes, nobody forges datasets against it): measured here at about 1 GB/s, so a
    second or two per 100M tokens, once per run. The rows a filter dropped or a selection skipped stay
    in the buffers; the order the dataset presents them in is hashed separately, from its indices
    mapping (``datasets`` has no public handle on it; without one, the order is the buffers' own).
    """
    if not isinstance(dataset, datasets.Dataset):
        return None
    table = dataset.data  # the Arrow table behind the dataset, in storage order
    checksums = []
    lengths = []
    for column in ("input_ids", "labels"):
        if column not in dataset.column_names:
            continue
        crc = 0
        for chunk in table.column(column).chunks:
            chunk_lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            crc = zlib.crc32(values.tobytes() if not values.flags.c_contiguous else memoryview(values), crc)
            crc = zlib.crc32(memoryview(np.ascontiguousarray(chunk_lengths)), crc)
            if column == "input_ids":
                lengths.append(chunk_lengths)
        checksums.append(crc)
    row_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    indices = datasets_private.indices_table(dataset)
    if indices is not None:
        order = np.ascontiguousarray(indices.column(0).to_numpy(zero_copy_only=False))
        row_lengths = row_lengths[order]
        checksums.append(zlib.crc32(memoryview(order)))
    return {
        "rows": int(len(row_lengths)),
        "tokens": int(row_lengths.sum()),
        "digest": "".join(f"{c:08x}" for c in checksums),
    }


def _plain(value: Any) -> Any:
    """A JSON value that compares equal after a round trip through the marker file."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(getattr(value, "value", value))


def model_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> tuple[str, str] | None:
    """(the checkpoint's model, this model) when they differ, else None."""
    old, new = recorded.get("model") or {}, current.get("model") or {}
    if not old or old.get("digest") == new.get("digest"):
        return None
    return old.get("description", "another model"), new.get("description", "another model")


def setting_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs apart from the model, one phrase each (``learning_rate 0.001 → 0.0002``)."""
    changes = []
    old_settings, new_settings = recorded.get("settings") or {}, current.get("settings") or {}
    for name in SETTINGS:
        if name in old_settings and old_settings[name] != new_settings.get(name):
            old_value, new_value = old_settings[name], new_settings.get(name)
            if name == "effective_batch":
                old_value = f"{old_value} ({_layout(recorded)})"
                new_value = f"{new_value} ({_layout(current)})"
            changes.append(f"{name} {old_value} → {new_value}")
    old_data, new_data = recorded.get("data"), current.get("data")
    if old_data and new_data and old_data.get("digest") != new_data.get("digest"):
        if (old_data["rows"], old_data["tokens"]) == (new_data["rows"], new_data["tokens"]):
            changes.append(
                f"training data: same {new_data['rows']} rows and {new_data['tokens']} tokens, other content"
            )
        else:
            changes.append(
                f"training data {old_data['rows']} rows, {old_data['tokens']} tokens → "
                f"{new_data['rows']} rows, {new_data['tokens']} tokens"
            )
    return changes


def _layout(fingerprint: dict[str, Any]) -> str:
    per_device, accumulation, processes = fingerprint.get("batch_layout") or ("?", "?", "?")
    return f"{per_device} per device × {accumulation} accumulated × {processes} processes"


def layout_change(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """How the same effective batch is now formed differently (more processes, less accumulation), if so."""
    old, new = recorded.get("batch_layout"), current.get("batch_layout")
    return f"{_layout(recorded)} → {_layout(current)}" if old and new and old != new else None
