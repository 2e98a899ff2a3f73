"""The model card: ``save_model_dir/README.md``, the first file the Hugging Face Hub and serving stacks read.

Hugging Face's conventions: YAML metadata at the top (``base_model``, ``library_name`` transformers or
peft, ``license``, ``datasets``, ``tags``, ``pipeline_tag``), then what was trained, on what, how, the
results and how to load it. Metadata fields the Hub validates carry only what is known to be a Hub id
(a local folder or file is named in the text instead); the license is the base model's, read from its
own card (its folder, the Hugging Face cache, or the Hub when online), else ``unknown``.

Written once, after the final model and the run summary exist (``tuning/sft_trainer.py``). For an
adapter it replaces the generic card peft writes; ``checkpoint-N`` folders keep peft's.
"""

from __future__ import annotations

import json
import logging
import shutil
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from tuning import __version__
from tuning.config import SFTConfig
from tuning.data import IMAGES, PreparedData, data_sources
from tuning.files import write_text_atomic
from tuning.outputs.audit_report import AUDIT_HTML_NAME, AUDIT_JSON_NAME, key_numbers
from tuning.outputs.plot import LOSS_PLOT_NAME
from tuning.train import read_eval_generations, read_training_logs

logger = logging.getLogger(__name__)

MODEL_CARD_NAME = "README.md"
METHOD_NAMES = {"none": "full fine-tuning", "lora": "LoRA", "alora": "aLoRA", "pt": "prompt tuning"}
METHOD_TAGS = {"none": "full-fine-tuning", "lora": "lora", "alora": "alora", "pt": "prompt-tuning"}
FRAMEWORKS = ("transformers", "torch", "peft", "accelerate", "datasets", "safetensors")
LOSS_TABLE_ROWS = 12  # rows of the loss table: evenly spaced steps, always the first and the last


def write_model_card(
    save_dir: str | Path,
    config: SFTConfig,
    summary: dict[str, Any],
    data: PreparedData,
    quant: Any = None,
    max_len: int | None = None,
) -> Path | None:
    """Write ``README.md`` (and a copy of ``loss.png``) into the final model folder; returns the card's
    path, or None when it could not be written (one warning: the model is saved, a card is not worth
    failing a finished run for).

    ``quant``: the quantization config the model was loaded with (None: not quantized); ``max_len``: the
    sequence length used (``max_seq_length`` capped by the model's context)."""
    try:
        return _write(Path(save_dir), config, summary, data, quant, max_len)
    except Exception as e:  # noqa: BLE001 (a bug here must not turn a finished run into a failed one)
        logger.warning("%s not written: %s: %s", MODEL_CARD_NAME, type(e).__name__, e)
        return None


def _write(
    folder: Path,
    config: SFTConfig,
    summary: dict[str, Any],
    data: PreparedData,
    quant: Any,
    max_len: int | None,
) -> Path:
    plot = Path(config.train.output_dir) / LOSS_PLOT_NAME
    has_plot = plot.is_file()
    if has_plot and plot.resolve() != (folder / LOSS_PLOT_NAME).resolve():
        shutil.copyfile(plot, folder / LOSS_PLOT_NAME)
    text = render_model_card(config, summary, data, quant, has_plot=has_plot, max_len=max_len)
    # a reader never sees half a card (peft's own card stays until then)
    return write_text_atomic(folder / MODEL_CARD_NAME, text)


def render_model_card(
    config: SFTConfig,
    summary: dict[str, Any],
    data: PreparedData,
    quant: Any = None,
    *,
    has_plot: bool,
    max_len: int | None = None,
) -> str:
    from huggingface_hub import ModelCardData

    adapter = config.peft.peft_method != "none"
    base = config.model.model_name_or_path or ""
    base_id = hub_model_id(base)
    method, method_tags = training_method(config, quant)
    license_fields = base_license(base)
    dataset_ids = sorted(
        {i for _, paths in data_sources(config.data) for p in paths if (i := hub_dataset_id(p))}
    )
    tags = ["tuning", "sft", *method_tags]
    if adapter:
        tags += ["transformers", f"base_model:adapter:{base_id or base}"]  # what peft's own card tags
    card = ModelCardData(
        base_model=base_id,
        library_name="peft" if adapter else "transformers",
        license=license_fields.get("license", "unknown"),
        license_name=license_fields.get("license_name"),
        license_link=license_fields.get("license_link"),
        datasets=dataset_ids or None,
        tags=tags,
        pipeline_tag="image-text-to-text" if _image_text(data) else "text-generation",
    )
    sections = [
        f"---\n{card.to_yaml()}\n---\n",
        _overview(config, method, base, base_id, license_fields),
        _training(config, data, max_len or config.data.max_seq_length),
        _results(config, summary, has_plot),
        _generations(config.train.output_dir),
        _serve_check(summary),
        _usage(config, summary, base, image_text=_image_text(data)),
        _framework_versions(adapter),
    ]
    return "\n".join(s.rstrip() + "\n" for s in sections)


def training_method(config: SFTConfig, quant: Any = None) -> tuple[str, list[str]]:
    """How the model was trained, in words and as tags, from the explicit modes of the config:
    ``peft_method`` and the quantization the model was loaded with."""
    peft = config.peft
    name, tags = METHOD_NAMES[peft.peft_method], [METHOD_TAGS[peft.peft_method]]
    if peft.peft_method in ("lora", "alora"):
        targets = (
            ", ".join(peft.target_modules) if peft.target_modules else "peft's default for the architecture"
        )
        variant = "".join(f", {v}" for v, on in (("rsLoRA", peft.use_rslora), ("DoRA", peft.use_dora)) if on)
        detail = (
            f"rank {peft.lora_r}, alpha {peft.lora_alpha}, dropout {peft.lora_dropout}{variant}; on {targets}"
        )
        if peft.target_parameters:
            detail += f"; parameters {', '.join(peft.target_parameters)}"
    elif peft.peft_method == "pt":
        detail = f"{peft.num_virtual_tokens} virtual tokens, initialised {peft.prompt_tuning_init.lower()}"
    else:
        detail = "every weight trained"
    if quant is not None:
        mode = config.quant.quantization_method
        if mode == "none":  # the checkpoint declared its quantization and was loaded that way
            declared = getattr(quant, "quant_method", "quantized")
            mode = str(getattr(declared, "value", declared))
        if getattr(quant, "dequantize", False):
            detail += f"; the {mode} checkpoint was dequantized to {config.model.torch_dtype} on load"
        elif peft.peft_method in ("lora", "alora"):
            name, tags = f"QLoRA ({name} on the frozen {mode}-quantized base)", [*tags, "qlora"]
        else:
            detail += f"; base weights kept {mode}-quantized"
    return f"{name}: {detail}", tags


def hub_model_id(name_or_path: str) -> str | None:
    """The Hub id of a model given as a Hub id or a Hugging Face cache snapshot folder; None for a local folder."""
    return _hub_id(name_or_path, "models--")


def hub_dataset_id(path: str) -> str | None:
    return _hub_id(path, "datasets--")


def _hub_id(name: str, cache_prefix: str) -> str | None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name).expanduser()
    if path.exists():
        # .../hub/models--org--name/snapshots/<revision>/...: the cache keeps the id in the folder name
        owner = next((p for p in reversed(path.resolve().parts) if p.startswith(cache_prefix)), None)
        return owner.removeprefix(cache_prefix).replace("--", "/") if owner else None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def base_license(name_or_path: str) -> dict[str, str]:
    """``license`` (and ``license_name``/``license_link`` for "other") from the base model's card: its
    folder's README.md, the Hugging Face cache, or the Hub when online; {} when none says."""
    data = _base_card_metadata(name_or_path)
    return {k: str(data[k]) for k in ("license", "license_name", "license_link") if data.get(k)}


def _base_card_metadata(name_or_path: str) -> dict[str, Any]:
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    local = Path(name_or_path).expanduser() / MODEL_CARD_NAME
    repo = hub_model_id(name_or_path)
    try:
        if local.is_file():
            return metadata_load(local) or {}
        if repo is None:
            return {}
        cached = try_to_load_from_cache(repo, MODEL_CARD_NAME)
        if isinstance(cached, str):
            return metadata_load(cached) or {}
        if constants.HF_HUB_OFFLINE:
            return {}
        info = model_info(repo, timeout=10)
        return info.card_data.to_dict() if info.card_data else {}
    except Exception as e:  # a card is documentation: an unreadable base card must not fail a finished run
        logger.info("license of %s unknown: %s: %s", name_or_path, type(e).__name__, e)
        return {}


def _overview(
    config: SFTConfig, method: str, base: str, base_id: str | None, license_fields: dict[str, str]
) -> str:
    title = (base_id or "").rsplit("/", 1)[-1] or Path(base.rstrip("/")).name or base
    what = "An adapter for" if config.peft.peft_method != "none" else "A fine-tuned version of"
    base_ref = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{base}` (a local folder)"
    licence = license_fields.get("license", "unknown")
    named = ", ".join(license_fields[k] for k in ("license_name", "license_link") if k in license_fields)
    licence_line = (
        f"License: `{licence}`{f' ({named})' if named else ''}, inherited from the base model."
        if licence != "unknown"
        else "License: unknown (the base model's card names none here); the base model's license applies."
    )
    return (
        f"# {title}, fine-tuned\n\n"
        f"{what} {base_ref}, trained by supervised fine-tuning with `tuning`.\n\n"
        f"- Method: {method}\n- {licence_line}"
    )


def _training(config: SFTConfig, data: PreparedData, max_len: int) -> str:
    lines = ["## Training data", ""]
    for name, paths in data_sources(config.data):
        shown = ", ".join(
            f"[{p}](https://huggingface.co/datasets/{p})" if hub_dataset_id(p) else f"`{p}`" for p in paths
        )
        lines.append(f"- {name}: {shown}")
    stats = data.stats
    samples = ""
    if stats.kept != stats.rows_kept:  # a chat template that rewrites history splits conversations
        samples = (
            f", made into {stats.kept} samples ({stats.conversations_split} conversations split into "
            f"{stats.split_samples} samples)"
        )
    lines += [
        "",
        f"{stats.rows_kept} of {stats.rows} training rows kept{samples} ({data.data_format} format), "
        f"{stats.total_tokens} tokens of which {stats.trained_tokens} carry loss.",
        "",
        *_audit_lines(data, config.train.output_dir),
        "## Training procedure",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    lines += [f"| {key} | {value} |" for key, value in _settings(config, max_len)]
    return "\n".join(lines)


def _audit_lines(data: PreparedData, output_dir: str) -> list[str]:
    """The data audit's key numbers, and where its files are (the run's output folder)."""
    if not data.audit:
        return []
    return [
        f"Data audit (`{AUDIT_HTML_NAME}` and `{AUDIT_JSON_NAME}` in the run's output folder "
        f"`{Path(output_dir).name}`): {key_numbers(data.audit)}.",
        "",
    ]


def _settings(config: SFTConfig, max_len: int) -> list[tuple[str, str]]:
    """The flags that decide what a run learns, with their resolved values (the rest: resolved_config.yaml)."""
    args, data = config.train, config.data
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    rows: list[tuple[str, Any]] = [("learning_rate", args.learning_rate)]
    rows.append(("lr_scheduler_type", getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)))
    if args.warmup_ratio is not None:
        rows.append(("warmup_ratio", args.warmup_ratio))
    elif args.warmup_steps:
        rows.append(("warmup_steps", args.warmup_steps))
    rows.append(
        ("max_steps", args.max_steps) if args.max_steps > 0 else ("num_train_epochs", args.num_train_epochs)
    )
    if args.max_tokens_per_batch:
        rows.append(("max_tokens_per_batch", args.max_tokens_per_batch))
    else:
        rows.append(("per_device_train_batch_size", args.per_device_train_batch_size))
    rows += [
        ("gradient_accumulation_steps", args.gradient_accumulation_steps),
        (
            "effective batch (samples per optimizer step)",
            batch if not args.max_tokens_per_batch else "by tokens",
        ),
        ("max_seq_length", max_len),
        ("torch_dtype", config.model.torch_dtype),
        ("optim", args.optim_name),
        ("weight_decay", args.weight_decay),
        ("max_grad_norm", args.max_grad_norm),
        ("packing", f"{data.packing_strategy}" if data.packing else "off"),
        ("padding_free", args.padding_free),
        ("gradient_checkpointing", args.gradient_checkpointing),
        ("seed", args.seed),
    ]
    literal = []  # values shown as code: the exact text the data stage used
    for key in ("response_template", "instruction_template", "data_formatter_template", "dataset_text_field"):
        if getattr(data, key):
            literal.append((key, json.dumps(getattr(data, key))))
    if data.add_special_tokens:
        literal.append(("add_special_tokens", " ".join(data.add_special_tokens)))
    if data.chat_template:
        rows.append(("chat_template", "custom (saved with the tokenizer)"))
    return [(k, _cell(str(v))) for k, v in rows] + [(k, _cell(f"`{v}`")) for k, v in literal]


def _cell(text: str) -> str:
    """A markdown table cell: a ``|`` (``<|im_start|>``) would end the cell, even inside backticks."""
    return text.replace("|", "\\|").replace("\n", " ")


def _results(config: SFTConfig, summary: dict[str, Any], has_plot: bool) -> str:
    def loss(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"

    lines = [
        "## Results",
        "",
        f"{summary['steps']} optimizer steps ({float(summary['epochs'] or 0):.2f} epochs), "
        f"{summary['trained_tokens']} trained tokens in {float(summary['train_seconds']):.0f} s.",
        "",
        "| loss | training | validation |",
        "| --- | ---: | ---: |",
        f"| final | {loss(summary['final_loss'])} | {loss(summary['final_validation_loss'])} |",
        f"| best | {loss(summary['best_loss'])} | {loss(summary['best_validation_loss'])} |",
    ]
    train_accuracy = summary.get("final_mean_token_accuracy")
    valid_accuracy = summary.get("final_validation_mean_token_accuracy")
    if train_accuracy is not None or valid_accuracy is not None:
        lines.append(f"| final token accuracy | {loss(train_accuracy)} | {loss(valid_accuracy)} |")
    stopping = summary.get("early_stopping")
    if stopping and stopping.get("stopped_at_step") is not None:
        lines += [
            "",
            f"Early stopping ended the run at step {stopping['stopped_at_step']}: `{stopping['metric']}` did not "
            f"improve by more than {stopping['threshold']:g} in {stopping['patience']} evaluations; best "
            f"{loss(stopping['best_metric'])} at step {stopping['best_step']} "
            f"(`{Path(stopping['best_model_checkpoint'] or 'n/a').name}`).",
        ]
    table = _loss_table(config.train.output_dir)
    if has_plot or table:
        lines += ["", "### Loss curve", ""]
    if has_plot:
        lines += [f"![training and validation loss]({LOSS_PLOT_NAME})", ""]
    return "\n".join(lines + table)


def _loss_table(output_dir: str) -> list[str]:
    try:
        train = read_training_logs(output_dir, "training_loss")
        valid = {r["step"]: r["value"] for r in read_training_logs(output_dir, "validation_loss")}
    except (OSError, ValueError, KeyError):  # no log file, or a damaged one: the card has the summary
        return []
    if not train:
        return []
    picked = sorted({round(i * (len(train) - 1) / (LOSS_TABLE_ROWS - 1)) for i in range(LOSS_TABLE_ROWS)})
    rows = ["| step | epoch | training loss | validation loss |", "| ---: | ---: | ---: | ---: |"]
    for record in (train[i] for i in picked if i < len(train)):
        val = valid.get(record["step"])
        rows.append(
            f"| {record['step']} | {record['epoch']:.2f} | {record['value']:.4f} | "
            f"{f'{val:.4f}' if val is not None else ''} |"
        )
    return rows


def _generations(output_dir: str) -> str:
    """Sample generations at the first and the last evaluation (``--eval_generations``)."""
    try:
        records = read_eval_generations(output_dir)
    except (OSError, ValueError):
        return ""
    if not records:
        return ""
    first, last = records[0]["step"], records[-1]["step"]
    at_last = {r["prompt"]: r["generation"] for r in records if r["step"] == last}
    lines = [
        "## Sample generations",
        "",
        f"Greedy answers to validation prompts at the first (step {first}) and the last (step {last}) "
        "evaluation; all of them are in `eval_generations.jsonl` of the output folder.",
        "",
        f"| prompt | reference | step {first} | step {last} |",
        "| --- | --- | --- | --- |",
    ]
    for r in (r for r in records if r["step"] == first):
        cells = (r["prompt"][-200:], r["reference"], r["generation"], at_last.get(r["prompt"], ""))
        lines.append("| " + " | ".join(f"`{_cell(c)}`" if c else "" for c in cells) + " |")
    return "\n".join(lines)


def _serve_check(summary: dict[str, Any]) -> str:
    """The serve-exact check's table (``tuning/outputs/serve_check.py``)."""
    check = summary.get("serve_check")
    if not check or not check.get("checks"):
        return ""
    lines = [
        "## Serving check",
        "",
        f"The saved folder was reloaded as a server loads it and checked against "
        f"{check.get('samples', 0)} training samples: **{'passed' if check['passed'] else 'FAILED'}**.",
        "",
        "| check | result | detail |",
        "| --- | --- | --- |",
    ]
    for item in check["checks"]:
        lines.append(f"| {_cell(item['name'])} | {item['result']} | {_cell(item.get('detail', ''))} |")
    if check.get("advice"):
        lines += ["", check["advice"]]
    return "\n".join(lines)


def _image_text(data: PreparedData) -> bool:
    """Whether the run trained an image-text model on image+text rows (docs/vision.md)."""
    return IMAGES in (getattr(data.train, "column_names", None) or [])


def _usage(config: SFTConfig, summary: dict[str, Any], base: str, *, image_text: bool = False) -> str:
    where = summary.get("save_model_dir") or "PATH"
    if image_text:
        load = (
            f'model = AutoModelForImageTextToText.from_pretrained("{where}")'
            if config.peft.peft_method == "none"
            else f'model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("{base}"), "{where}")'
        )
        return (
            "## Use\n\n```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
            + ("from peft import PeftModel\n" if config.peft.peft_method != "none" else "")
            + f'\n{load}\nprocessor = AutoProcessor.from_pretrained("{where}")\n```\n\n'
            "The processor (tokenizer, image processor, chat template) is saved with it (docs/vision.md)."
        )
    if config.peft.peft_method == "none":
        return (
            "## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{where}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n```\n\n'
            f"Serve it as any model folder, e.g. `vllm serve {where}`."
        )
    text = (
        "## Use\n\nThe folder holds the adapter only; the base model is loaded from `adapter_config.json`:\n\n"
        "```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{where}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n```\n'
    )
    if config.data.add_special_tokens:
        return text + (
            "\nThe adapter adds tokens to the vocabulary (`added_tokens_info.json`): load it on a base whose "
            "embeddings are resized to `new_embedding_size` first. Servers whose LoRA loaders take no new "
            "vocabulary (current vLLM) need one standalone model: "
            f"`tuning merge --adapter {where} --output merged`."
        )
    if config.peft.peft_method == "lora":
        return text + (
            f"\nServe it on the base, e.g. `vllm serve {base} --enable-lora --lora-modules adapter={where}`, "
            f"or fold it into a standalone model with `tuning merge --adapter {where} --output merged`."
        )
    return text


def _framework_versions(adapter: bool) -> str:
    lines = ["## Framework versions", "", f"- tuning {__version__}"]
    for package in FRAMEWORKS:
        if package == "peft" and not adapter:
            continue
        try:
            lines.append(f"- {package} {importlib_metadata.version(package)}")
        except importlib_metadata.PackageNotFoundError:
            continue
    return "\n".join(lines)
