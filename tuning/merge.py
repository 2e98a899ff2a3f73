"""``tuning merge``: fold a LoRA adapter into its base model and write a standard model folder.

The result (sharded safetensors, config, generation config, tokenizer) loads with ``from_pretrained``,
vLLM or conversion tools without peft. Added tokens (``added_tokens_info.json``) grow the base's
embeddings first; rows split out to ``new_embeddings.safetensors`` are copied back in.
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, PeftType
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from tuning.dtypes import DTYPE_NAMES, torch_dtype
from tuning.errors import ArgumentParser, UserError, first_line, run_command
from tuning.files import publish_folder, refused_pickle, staging_folder
from tuning.logs import setup_logging
from tuning.model import (
    ADDED_TOKENS_INFO_NAME,
    NEW_EMBEDDING_KEYS,
    NEW_EMBEDDINGS_NAME,
    is_image_text,
    model_auto_class,
    processor_from,
    save_processor,
)

logger = logging.getLogger("tuning")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tuning merge",
        description="Fold a LoRA adapter into its base model; write a plain model folder.",
    )
    parser.add_argument("--adapter", required=True, help="Adapter folder (adapter_config.json).")
    parser.add_argument("--output", required=True, help="Folder for the merged model (must be empty).")
    parser.add_argument(
        "--base", default=None, help="Base model; default: the adapter's base_model_name_or_path."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace the files of a non-empty --output.")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPE_NAMES),
        help="Weights dtype (default: the base checkpoint's).",
    )
    parser.add_argument("--max_shard_size", default="5GB", help="Largest safetensors shard (default 5GB).")
    return parser


def merge(
    adapter: str, output: str, base: str | None = None, *, overwrite: bool = False, **opts: Any
) -> Path:
    """Merge ``adapter`` into ``base`` and save it to ``output``; returns the output folder."""
    adapter_dir, out = Path(adapter), Path(output)
    config = _adapter_config(adapter_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"--output {out} is not an empty folder; pass an empty or new folder, or --overwrite")
    base_name = base or config.base_model_name_or_path
    if not base_name:
        raise UserError(f"{adapter_dir} does not name its base model; pass --base MODEL")
    model = _load_base(base_name, adapter_dir, torch_dtype(opts.get("dtype", "auto")))
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except pickle.UnpicklingError as e:  # an adapter_model.bin with more than tensors in it
        raise (refused_pickle(e, f"adapter {adapter_dir}") or e) from None
    source = adapter_dir if _has_tokenizer(adapter_dir) else base_name
    tmp = staging_folder(out)
    merged.save_pretrained(tmp, max_shard_size=opts.get("max_shard_size", "5GB"))
    if is_image_text(merged.config):  # the processor (image processor, chat template) goes with it
        save_processor(processor_from(str(source)), tmp)
    else:
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    publish_folder(tmp, out)
    logger.info("merged %s into %s: %s", adapter_dir, base_name, out)
    return out


def _adapter_config(adapter_dir: Path) -> Any:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"--adapter {adapter_dir} has no adapter_config.json; pass a saved adapter folder")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if config.peft_type != PeftType.LORA:
        raise UserError(
            f"--adapter {adapter_dir} is {config.peft_type.value}, which has no weights to fold into the "
            "base model; serve it with peft (PeftModel.from_pretrained) instead"
        )
    if getattr(config, "alora_invocation_tokens", None):
        raise UserError(
            f"--adapter {adapter_dir} is an activated LoRA: it applies only after its invocation tokens, "
            "so merging would change every token; serve it with peft or vLLM's aLoRA support"
        )
    return config


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def _load_base(name: str, adapter_dir: Path, dtype: Any) -> Any:
    try:
        model = model_auto_class(AutoConfig.from_pretrained(name)).from_pretrained(name, dtype=dtype)
    except pickle.UnpicklingError as e:
        raise (refused_pickle(e, f"base model {name}") or e) from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load base model {name}: {first_line(e)}; pass --base MODEL") from None
    info_file = adapter_dir / ADDED_TOKENS_INFO_NAME
    if info_file.is_file():
        info = json.loads(info_file.read_text(encoding="utf-8"))
        base_rows = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(info["new_embedding_size"])
        _copy_split_rows(model, adapter_dir / NEW_EMBEDDINGS_NAME, base_rows)
    return model


def _copy_split_rows(model: Any, path: Path, first_row: int) -> None:
    """Rows written by ``--save_new_embeddings_separately`` go back where the adapter trained them."""
    if not path.is_file():
        return
    tables = load_file(path)
    layers = {"input": model.get_input_embeddings(), "output": model.get_output_embeddings()}
    with torch.no_grad():
        for side, layer in layers.items():
            rows = tables.get(NEW_EMBEDDING_KEYS[side])
            if rows is not None and layer is not None:
                layer.weight[first_row : first_row + rows.shape[0]] = rows.to(layer.weight.dtype)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()

    def body() -> int:
        args = build_parser().parse_args(argv)
        merge(
            args.adapter,
            args.output,
            args.base,
            overwrite=args.overwrite,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
        )
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
