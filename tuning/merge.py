"""``tuning merge``: fold a LoRA adapter into its base model and write a standard model folder.

The result (sharded safetensors, config, generation config, tokenizer) loads with ``from_pretrained``,
vLLM or conversion tools without peft. Added tokens (``added_tokens_info.json``) grow the base's
embeddings first; rows split out to ``new_embeddings.safetensors`` are copied back in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, PeftType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuning.errors import INTERNAL_ERROR_EXIT_CODE, USER_ERROR_EXIT_CODE, UserError
from tuning.files import refused_pickle
from tuning.model.peft import ADDED_TOKENS_INFO_NAME, NEW_EMBEDDING_KEYS, NEW_EMBEDDINGS_NAME

logger = logging.getLogger("tuning")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}


class _Parser(argparse.ArgumentParser):
    """A bad command line is a user error like any other: exit 1 with one line, not argparse's 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"invalid command line: {message}; run tuning merge --help")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        choices=list(DTYPES),
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
    model = _load_base(base_name, adapter_dir, DTYPES[opts.get("dtype", "auto")])
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except pickle.UnpicklingError as e:  # an adapter_model.bin with more than tensors in it
        raise (refused_pickle(e, f"adapter {adapter_dir}") or e) from None
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if _has_tokenizer(adapter_dir) else base_name)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, max_shard_size=opts.get("max_shard_size", "5GB"))
    tokenizer.save_pretrained(tmp)
    _move_into(tmp, out)
    logger.info("merged %s into %s: %s", adapter_dir, base_name, out)
    return out


def _move_into(tmp: Path, out: Path) -> None:
    """Complete files only: the new folder is renamed into place, or (``--overwrite``) its files replace
    the old ones; stale weight shards of an earlier merge are removed, the folder's other files are kept."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not out.is_dir():
        out.unlink()
        os.rename(tmp, out)
        return
    new = {item.name for item in tmp.iterdir()}
    for stale in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        if stale.name not in new:
            stale.unlink()
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()


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
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except pickle.UnpicklingError as e:
        raise (refused_pickle(e, f"base model {name}") or e) from None
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load base model {name}: {str(e).splitlines()[0]}; pass --base MODEL"
        ) from None
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
    if not logger.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
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
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except Exception as e:  # not a user mistake: ours to fix, with the traceback
        traceback.print_exc()
        print(f"internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return INTERNAL_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
