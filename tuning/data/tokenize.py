"""Text + trained character spans → ``input_ids`` and ``labels``, built together, invariants checked.

Every text format reduces to the same contract: the text to train on and the character spans whose
tokens carry loss. Masking by character offsets (not by searching a token-id sequence) finds a
response marker even when its tokens merge with the text before it (a leading ``\\n`` is the usual case).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuning.errors import UserError, check

IGNORE_INDEX = -100
Span = tuple[int, int]

# Per-row outcome recorded next to the tokens, so the pipeline can count and report dropped rows.
OK = "ok"
NO_TEMPLATE = "response_template_not_found"
NOTHING_TRAINED = "no_trained_token_after_truncation"


def trained_mask(offsets: Sequence[Sequence[int]], spans: Sequence[Span]) -> list[bool]:
    """A token carries loss when it covers at least one character inside a span.

    A token that straddles a span boundary (``":"`` merged with the answer's first letters) is trained,
    because it produces answer text. Zero-width tokens (special tokens such as BOS) never are.
    """
    return [e > s and any(e > a and s < b for a, b in spans) for s, e in offsets]


def build_labeled_ids(
    ids: list[int],
    offsets: Sequence[Sequence[int]],
    spans: Sequence[Span],
    *,
    eos_id: int | None,
    max_len: int,
    append_eos: bool,
) -> tuple[list[int], list[int], str, bool, int]:
    """Tokens, labels, a status, whether it was truncated and how many trained tokens that cut, for one sample: EOS appended (and trained) unless present, then
    truncated to ``max_len``. A truncated sample keeps no EOS: it did not end there."""
    mask = trained_mask(offsets, spans)
    ids = list(ids)
    if append_eos and eos_id is not None:
        if ids and ids[-1] == eos_id:
            mask[-1] = True
        else:
            ids.append(eos_id)
            mask.append(True)
    truncated = len(ids) > max_len
    lost = sum(mask[max_len:])
    ids, mask = ids[:max_len], mask[:max_len]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    status = OK if any(mask) else NOTHING_TRAINED
    return ids, labels, status, truncated, lost


def check_invariants(ids: list[int], labels: list[int], *, eos_id: int | None, complete: bool) -> None:
    """What every training sample must satisfy; a violation is a bug in this package, not user error."""
    check(len(ids) == len(labels), "labels and input_ids differ in length")
    check(
        all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(ids, labels, strict=True)),
        "a label differs from its input token (labels must be input_ids or ignored)",
    )
    if complete and eos_id is not None:
        check(ids[-1] == eos_id and labels[-1] == eos_id, "a complete sample must end with a trained EOS")


def encode(tokenizer: Any, texts: list[str], *, add_special_tokens: bool = True, **kwargs: Any) -> dict:
    """``tokenizer(texts, ...)`` without a doubled BOS: a text that already starts with the BOS token (a
    chat template wrote it: Llama, Mistral, Gemma) does not get a second one from the tokenizer."""
    enc = dict(tokenizer(texts, add_special_tokens=add_special_tokens, **kwargs))
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if not add_special_tokens or bos is None or bos_id is None:
        return enc
    for i, (text, ids) in enumerate(zip(texts, enc["input_ids"], strict=True)):
        if len(ids) > 1 and ids[0] == ids[1] == bos_id and text.startswith(bos):
            for key in ("input_ids", "offset_mapping", "attention_mask"):
                if key in enc:
                    enc[key][i] = enc[key][i][1:]
    return enc


def require_offsets(tokenizer: Any) -> None:
    """Loss masking maps character spans to tokens through offsets, which only fast tokenizers give."""
    if not getattr(tokenizer, "is_fast", True):
        raise UserError(
            f"tokenizer {type(tokenizer).__name__} is a slow (Python) tokenizer; loss masking needs "
            "character offsets: use a fast tokenizer (tokenizer.json)"
        )


def tokenize_batch(
    tokenizer: Any,
    texts: list[str],
    spans: list[list[Span]],
    *,
    max_len: int,
    add_special_tokens: bool = True,
    append_eos: bool = True,
) -> dict[str, list]:
    """Batched fast tokenization with offsets; returns ``input_ids``, ``labels``, ``status`` and
    ``truncated`` and ``trained_lost`` lists (one entry per text)."""
    require_offsets(tokenizer)
    enc = encode(tokenizer, texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    eos_id = tokenizer.eos_token_id
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": [], "truncated": [], "trained_lost": []}
    for ids, offsets, sample_spans in zip(enc["input_ids"], enc["offset_mapping"], spans, strict=True):
        new_ids, labels, status, truncated, lost = build_labeled_ids(
            ids, offsets, sample_spans, eos_id=eos_id, max_len=max_len, append_eos=append_eos
        )
        check_invariants(new_ids, labels, eos_id=eos_id, complete=append_eos and not truncated)
        out["input_ids"].append(new_ids)
        out["labels"].append(labels)
        out["status"].append(status)
        out["truncated"].append(truncated)
        out["trained_lost"].append(lost)
    return out


def trained_pieces(ids: Sequence[int], labels: Sequence[int], tokenizer: Any) -> list[tuple[str, bool]]:
    """A sample's text as (piece, trained) runs, for showing it with the trained tokens marked (``tuning
    preview``, the audit page). Runs are cut out of the decoded prefixes, not decoded alone, so spaces
    that a tokenizer attaches to a token's start survive."""
    import itertools

    out, start, previous = [], 0, ""
    for trained, group in itertools.groupby(range(len(ids)), key=lambda k: labels[k] != IGNORE_INDEX):
        end = start + len(list(group))
        text = tokenizer.decode(list(ids[:end]), skip_special_tokens=False)
        piece = text[len(previous) :] if text.startswith(previous) else tokenizer.decode(list(ids[start:end]))
        out.append((piece, trained))
        start, previous = end, text
    return out
