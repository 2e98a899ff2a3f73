"""The serve-exact check: reload a saved folder the way a server does and prove it serves what was trained.

A fine-tuned model that "never stops" or "answers garbage" once served almost always differs from its
training run in the files around the weights: a chat template that is not the one trained with (or
none), a ``generation_config.json`` whose ``eos_token_id`` lacks the end-of-turn token the run trained,
a tokenizer without the added tokens, a prompt encoded with a second BOS, a response template that
tokenizes differently on its own than inside the training text. Each of these is checked here on a
few training rows, from the saved files only (``AutoTokenizer``/``GenerationConfig``/``AutoConfig``
``from_pretrained``: no weights are loaded). No other tool we know of does this; vLLM and TGI read
exactly these files.

For an adapter the base model's ``generation_config.json`` is the one a server uses (peft saves none),
and vLLM refuses adapters that carry whole modules (``modules_to_save``) or new/trainable token
embeddings: those must be merged first (``tuning merge``), and the merged folder carries the adapter's
tokenizer and the base's generation config, which are the files checked here.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from tuning.config import DataArgs
from tuning.data import IGNORE_INDEX, serving_view
from tuning.files import write_text_atomic
from tuning.model import context_length

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 16  # training rows checked: a template or tokenizer difference shows on the first few
ADAPTER_CONFIG = "adapter_config.json"
NEW_EMBEDDINGS = "new_embeddings.safetensors"  # tuning/model/peft.py's name for vLLM's extra-vocab file
MERGE_ADVICE = "run `tuning merge` before serving with vLLM"
# the first samples the run trained on, kept beside the model: `tuning check` compares the files with them
TRAINED_SAMPLES_NAME = "trained_samples.json"


def run_serve_check(
    folder: str | Path,
    data_args: DataArgs,
    max_len: int | None = None,
    trained: list[dict[str, list[int]]] | None = None,
    limit: int = SAMPLE_ROWS,
) -> dict[str, Any]:
    """Check ``folder`` against the first ``limit`` training rows; returns the summary's ``serve_check``
    entry: ``passed``, ``samples``, ``checks`` (``name``, ``result`` pass/FAIL/n/a, ``detail``), ``advice``.

    ``trained``: the samples the run trained on for these rows (input_ids + labels), else those the run
    recorded in ``trained_samples.json`` beside the model: the saved files must reproduce them token for
    token (a template or tokenizer changed after saving shows here)."""
    folder = Path(folder)
    adapter = _read_json(folder / ADAPTER_CONFIG)
    base = (adapter or {}).get("base_model_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config_source = base if adapter else folder
    model_config = AutoConfig.from_pretrained(config_source)
    max_len = max_len or context_length(model_config, data_args.max_seq_length)
    has_generation_config = (folder / "generation_config.json").is_file()
    eos = _eos_ids(folder if has_generation_config or not adapter else base, model_config)
    server_stops = tuple(
        dict.fromkeys([*eos, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])])
    )
    view = serving_view(data_args, tokenizer, max_len, server_stops, limit)
    checks: list[dict[str, str]] = []

    def add(name: str, problem: str | None, detail: str = "", applies: bool = True) -> None:
        result = "n/a" if not applies else ("FAIL" if problem else "pass")
        checks.append({"name": name, "result": result, "detail": (problem or detail) if applies else detail})

    if trained is None:
        trained = (_read_json(folder / TRAINED_SAMPLES_NAME) or {}).get("samples")
    add(
        "saved tokenizer + template give the trained tokens",
        _compare_samples(trained[: len(view.samples)], view.samples, tokenizer) if trained else None,
        f"{len(view.samples)} samples identical" if trained else f"no {TRAINED_SAMPLES_NAME} to compare with",
        applies=bool(trained),
    )
    add(
        "server-rendered prompts equal the trained contexts",
        _check_prompts(view.server_prompts, view.samples, tokenizer),
        f"{len(view.server_prompts)} prompts",
        applies=bool(view.server_prompts),
    )
    add(
        "trained end of turn is in generation_config.eos_token_id",
        _check_stops(view.samples, eos, tokenizer),
        f"eos_token_id {list(eos)}",
    )
    vocab = _vocab_rows(model_config)
    add(
        "tokenizer fits the model's embeddings",
        None
        if vocab is None or len(tokenizer) <= vocab
        else f"the tokenizer has {len(tokenizer)} tokens and the saved model {vocab} embedding rows",
        f"{len(tokenizer)} tokens, {vocab} rows" if not adapter else "an adapter: see the vLLM check",
        applies=not adapter,  # an adapter's added rows: the vLLM check below
    )
    advice = None
    if adapter:
        refusal = _vllm_adapter_refusal(folder, adapter, len(tokenizer), vocab)
        add("vLLM can serve the adapter as it is", refusal, "LoRA weights only")
        if refusal:
            checks[-1]["result"] = "merge first"  # not a failure: the merged folder serves
            advice = (
                f"{MERGE_ADVICE}: {refusal}. The merged folder carries this tokenizer and the base's "
                "generation_config.json, the files the checks above read."
            )
    failed = [c for c in checks if c["result"] == "FAIL"]
    result = {"passed": not failed, "folder": str(folder), "samples": len(view.samples), "checks": checks}
    result["advice"] = advice
    if trained:
        result["trained"] = trained  # for the merged folder's check; not written to the summary
    return result


def check_saved_model(
    folder: Path, data_args: DataArgs, max_len: int, tokenizer: Any, stop_ids: tuple[int, ...]
) -> dict[str, Any]:
    """The check after the final save (``--serve_check``): the summary's entry; never fails the run by
    itself (``--serve_check error`` fails it after the summary and card are written)."""
    if data_args.data_config_path or not data_args.training_data_path:
        return {
            "passed": None,
            "folder": str(folder),
            "checks": [],
            "skipped": "a data config: run `tuning check`",
        }
    start = time.perf_counter()
    try:
        trained = serving_view(data_args, tokenizer, max_len, stop_ids, SAMPLE_ROWS).samples
        record = {"training_data_path": data_args.training_data_path, "samples": trained}
        write_text_atomic(folder / TRAINED_SAMPLES_NAME, json.dumps(record, separators=(",", ":")) + "\n")
        result = run_serve_check(folder, data_args, max_len, trained)
    except Exception as e:  # noqa: BLE001 (the model is saved; a check that could not run is a warning)
        logger.warning(
            "serve check not run: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else ""
        )
        return {"passed": None, "folder": str(folder), "checks": [], "skipped": f"{type(e).__name__}: {e}"}
    result["seconds"] = round(time.perf_counter() - start, 3)
    result.pop("trained", None)
    report_serve_check(result)
    return result


def report_serve_check(result: dict[str, Any], log: bool = True) -> str | None:
    """Log the result (``log``); the one-line failure message for ``--serve_check error`` (None: passed)."""
    failed = [c for c in result["checks"] if c["result"] == "FAIL"]
    if log:
        if result.get("advice"):
            logger.warning("serve check: %s", result["advice"])
        for check in failed:
            logger.warning("serve check FAILED: %s: %s", check["name"], check["detail"])
        if not failed:
            logger.info("serve check passed: %s (%d samples)", result["folder"], result["samples"])
    if not failed:
        return None
    return f"serve check of {result['folder']} failed: {failed[0]['name']}: {failed[0]['detail']}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _eos_ids(source: str | Path, model_config: Any) -> tuple[int, ...]:
    """``generation_config.eos_token_id`` as a server reads it (``config.json``'s when there is none)."""
    try:
        eos = GenerationConfig.from_pretrained(source).eos_token_id
    except (OSError, ValueError):
        eos = getattr(model_config, "eos_token_id", None)
    return tuple(int(i) for i in ([eos] if isinstance(eos, int) else (eos or [])))


def _vocab_rows(model_config: Any) -> int | None:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text, "vocab_size", None)


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of trained positions."""
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _show(tokenizer: Any, ids: list[int]) -> str:
    return repr(tokenizer.decode(ids))[:80]


def _compare_samples(trained: list[dict], saved: list[dict], tokenizer: Any) -> str | None:
    if len(trained) != len(saved):
        return f"the saved files make {len(saved)} samples of the rows the run made {len(trained)} of"
    for n, (a, b) in enumerate(zip(trained, saved, strict=True)):
        for key in ("input_ids", "labels"):
            if a[key] != b[key]:
                i = next((i for i, (x, y) in enumerate(zip(a[key], b[key], strict=False)) if x != y), None)
                i = min(len(a[key]), len(b[key])) if i is None else i
                return (
                    f"sample {n}: {key} differ from position {i}: trained {_show(tokenizer, a['input_ids'][i : i + 8])}, "
                    f"saved files give {_show(tokenizer, b['input_ids'][i : i + 8])}"
                )
    return None


def _check_prompts(prompts: list[list[int]], samples: list[dict], tokenizer: Any) -> str | None:
    contexts = {tuple(s["input_ids"][:start]) for s in samples for start, _ in _spans(s["labels"])}
    bos = tokenizer.bos_token_id
    for prompt in prompts:
        if tuple(prompt) in contexts:
            continue
        if bos is not None and prompt[:2] == [bos, bos]:
            return f"a server prompt starts with a doubled BOS {tokenizer.convert_ids_to_tokens(bos)!r}"
        # the trained context sharing the longest prefix: where the two part
        best = max(contexts, key=lambda c: _common(c, prompt), default=())
        i = _common(best, prompt)
        return (
            f"a server-rendered prompt differs from the trained context at token {i}: server "
            f"{_show(tokenizer, prompt[i : i + 8])}, trained {_show(tokenizer, list(best[i : i + 8]))}"
        )
    return None


def _common(a: Any, b: Any) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _check_stops(samples: list[dict], eos: tuple[int, ...], tokenizer: Any) -> str | None:
    """Each trained span that ends on a special token (the turn's end, or the EOS after a text answer)
    must end on one the server stops on; spans ending on ordinary text were cut by truncation."""
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    for s in samples:
        for _, end in _spans(s["labels"]):
            last = s["input_ids"][end - 1]
            if last in special and last not in eos:
                return (
                    f"the run trained turns to end with {tokenizer.convert_ids_to_tokens(last)!r} (id {last}) "
                    f"and generation_config.eos_token_id is {list(eos)}: a server would not stop there"
                )
    return None


def _vllm_adapter_refusal(
    folder: Path, adapter: dict[str, Any], tokens: int, vocab: int | None
) -> str | None:
    """Why vLLM would refuse this adapter as an adapter (None: it serves it)."""
    if adapter.get("peft_type") not in (None, "LORA"):
        return f"vLLM serves LoRA adapters only, and this one is {adapter.get('peft_type')}"
    if adapter.get("modules_to_save"):
        return f"it saves whole modules (modules_to_save {adapter['modules_to_save']})"
    if adapter.get("trainable_token_indices"):
        return "it trains token embeddings (trainable_token_indices)"
    if (folder / NEW_EMBEDDINGS).is_file() or (vocab is not None and tokens > vocab):
        return f"it adds tokens to the vocabulary ({tokens} tokens, the base has {vocab} rows)"
    targets = adapter.get("target_modules") or []
    embedding = [
        t for t in ([targets] if isinstance(targets, str) else targets) if "embed" in t or t == "lm_head"
    ]
    if embedding:
        return f"it adapts the embeddings or the output head ({', '.join(embedding)})"
    return None
