"""The data audit's files: ``output_dir/data_audit.json`` (the document ``tuning.data`` builds) and
``output_dir/data_audit.html``, one self-contained page (inline CSS and SVG, nothing fetched): the
per-source table, the gates, the trained-token share per source, length histograms and a few samples per
source with the trained tokens highlighted as ``tuning preview`` colours them, and for image+text data each
sample's images as small inline thumbnails where its image tokens are.

The plots are drawn as SVG here rather than with matplotlib (which the loss plot uses): a few dozen
rectangles need no library, and text SVG keeps the page small and searchable."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

from tuning.data import (
    IGNORE_INDEX,
    IMAGES,
    audit_table,
    check_gates,
    collapse_image_runs,
    data_audit,
    epochs_of,
    load_image,
    trained_pieces,
)
from tuning.errors import UserError
from tuning.files import write_text_atomic
from tuning.train import AUDIT_HTML_NAME, AUDIT_JSON_NAME, new_record_path

logger = logging.getLogger("tuning")

_SAMPLE_CHARS = 4000  # of each shown sample: a page people open, not a dump
# Images are re-encoded as thumbnails of at most _THUMB_PX a side, inline (data: URIs, so the page stays one
# self-contained file), and at most _IMAGE_BYTES of them (base64) per page: past that cap, and for a file
# that can't be read or without Pillow, an image shows as its text marker only.
_THUMB_PX = 128
_IMAGE_BYTES = 1_000_000
_PNG_BYTES = 12_000  # a thumbnail whose PNG is larger (a photo) is sent as JPEG instead

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #d5d9e2;padding:3px 8px;text-align:right}
th{background:#f1f3f8}td:first-child,th:first-child{text-align:left}
.fail{color:#a4161a;font-weight:600}.warn{color:#9a6700}.ok{color:#1a7f37}
.sample{white-space:pre-wrap;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace;background:#f7f7f9;
border:1px solid #e1e4ea;padding:8px;max-height:320px;overflow:auto}
mark{background:#c8f0d0;color:#0a5a1e;border-radius:2px}
.note{color:#5a6270;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:16px}.wide{overflow-x:auto}
.sample img{vertical-align:middle;border:1px solid #c9cedb;margin:2px;max-width:128px;max-height:128px}
.image{color:#5a6270;background:#eceef3;border-radius:2px}
"""


def write_audit(
    audit: dict[str, Any], data: Any, tokenizer: Any, output_dir: str | Path, processor: Any = None
) -> tuple[Path, Path]:
    """Write ``data_audit.json`` and ``data_audit.html`` into ``output_dir`` (a training run's pending
    records until its first commit: ``tuning/train/records.py``); returns both paths.
    ``data`` is the PreparedData whose sources hold the samples shown; ``processor``: an image-text
    model's, whose image tokens mark where each sample's images are shown."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_text_atomic(new_record_path(out, AUDIT_JSON_NAME), json.dumps(audit, indent=2) + "\n")
    examples = {s.name: s.stats.examples for s in data.sources}
    html_path = write_text_atomic(
        new_record_path(out, AUDIT_HTML_NAME), render_page(audit, examples, tokenizer, processor)
    )
    return json_path, html_path


def run_audit(
    data: Any,
    args: Any,
    tokenizer: Any,
    max_len: int,
    epochs: float | None,
    output_dir: str | Path | None,
    *,
    gates_first: bool,
    processor: Any = None,
) -> dict[str, Any]:
    """The audit of prepared data: built from its counters, logged as a table, written to ``output_dir``
    (None: not written) and its gates applied. ``gates_first``: a failing gate stops before anything is
    written (a training run leaves its folder as it was); otherwise the files are written first (``tuning
    audit``: the page shows why)."""
    audit = data_audit(data, args, max_len, epochs)
    data.audit = audit
    table = "\n".join("  " + line for line in audit_table(audit).splitlines())  # rows indented, as the plan's
    logger.info("data audit (per source; data_audit.json has every figure):\n%s", table)
    where = f"see {Path(output_dir) / AUDIT_HTML_NAME}" if output_dir and not gates_first else ""
    if gates_first:
        check_gates(audit, "`tuning audit` with the same flags writes the audit page")
    if output_dir:
        write_audit(audit, data, tokenizer, output_dir, processor)
    if not gates_first:
        check_gates(audit, where)
    return audit


def key_numbers(audit: dict[str, Any]) -> str:
    """One sentence of the audit's key numbers (the model card links the audit with it)."""
    t = audit["total"]
    share = 100 * t["figures"]["trained_tokens_fraction"]
    return (
        f"{t['rows']['kept']} of {t['rows']['read']} rows kept, {t['samples']['kept']} samples "
        f"({t['samples']['dropped']} dropped, {t['truncated']} truncated, {t['duplicate_samples']} exact "
        f"duplicates, {t['empty_trained_text']} with empty trained text); {t['tokens']['trained']} of "
        f"{t['tokens']['total']} tokens trained ({share:.1f}%)"
    )


def _e(value: Any) -> str:
    return html.escape(str(value))


def render_page(
    audit: dict[str, Any], examples: dict[str, list[dict]], tokenizer: Any, processor: Any = None
) -> str:
    docs = audit["sources"]
    budget = [_IMAGE_BYTES]  # left for images on this page
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>Data audit</title><style>{_CSS}</style></head><body>",
        "<h1>Data audit</h1>",
        f"<p class='note'>max_seq_length {audit['max_seq_length']}; {_e(key_numbers(audit))}. "
        "Figures: docs/data.md, section Audit.</p>",
        _gates(audit["gates"]),
        "<h2>Sources</h2>",
        _source_table([*docs, audit["total"]]),
        _drop_table([*docs, audit["total"]]),
        _chat_table([*docs, audit["total"]]),
        "<h2>Trained-token share per source</h2>",
        _share_chart(audit["trained_token_share"]),
        "<h2>Sample lengths (tokens, after truncation)</h2><div class='charts'>",
        *(_histogram(d) for d in docs),
        "</div><h2>Samples</h2>",
        "<p class='note'>The first kept samples of each source; <mark>highlighted</mark> tokens carry loss, "
        "the rest is context.</p>",
    ]
    for doc in docs:
        parts.append(f"<h3>{_e(doc['name'])}</h3>")
        shown = examples.get(doc["name"]) or []
        if not shown:
            parts.append("<p class='note'>no samples shown (--audit_samples)</p>")
        for i, sample in enumerate(shown):
            parts.append(_sample(i, sample, tokenizer, processor, budget))
    parts.append("</body></html>")
    return "\n".join(parts)


def _gates(gates: list[dict]) -> str:
    if not gates:
        return "<p class='ok'>All gates pass.</p>"
    items = []
    for g in gates:
        what = f"{g['figure']} {g['value']:g} vs {g['flag']} {g['threshold']:g}"
        note = f" ({_e(g['note'])})" if g["note"] else ""
        items.append(f"<li class='{g['level']}'>{g['level']}: {_e(g['source'])}: {_e(what)}{note}</li>")
    return "<h2>Gates</h2><ul>" + "".join(items) + "</ul>"


def _source_table(docs: list[dict]) -> str:
    head = (
        "source",
        "format",
        "rows read",
        "rows kept",
        "samples",
        "samples dropped",
        "truncated",
        "trained tokens lost",
        "tokens",
        "trained",
        "trained %",
        "duplicates",
        "empty trained",
        "min",
        "median",
        "p95",
        "max",
        "over max %",
        "template found %",
        "epochs",
    )
    rows = []
    for d in docs:
        lengths, template, epochs = d["lengths"], d["response_template"], epochs_of(d)
        cells = (
            d["name"],
            d["format"],
            d["rows"]["read"],
            d["rows"]["kept"],
            d["samples"]["kept"],
            d["samples"]["dropped"],
            d["truncated"],
            d["trained_tokens_lost_to_truncation"],
            d["tokens"]["total"],
            d["tokens"]["trained"],
            f"{100 * d['figures']['trained_tokens_fraction']:.1f}",
            d["duplicate_samples"],
            d["empty_trained_text"],
            lengths["min"],
            f"{lengths['median']:g}",
            f"{lengths['p95']:g}",
            lengths["max"],
            f"{100 * lengths.get('over_max_seq_length_fraction', 0):.1f}",
            "-" if template is None else f"{100 * template['fraction']:.1f}",
            "-" if epochs is None else f"{epochs:g}",
        )
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
    return f"<div class='wide'><table id='sources'>{header}{''.join(rows)}</table></div>"


def _drop_table(docs: list[dict]) -> str:
    reasons = sorted({r for d in docs for r in d["samples"]["dropped_by_reason"]})
    removed = any(d["rows"]["removed_by_handlers"] for d in docs)
    if not reasons and not removed:
        return "<p class='note'>No row or sample was dropped.</p>"
    head = [
        "source",
        *(["rows removed by handlers"] if removed else []),
        *(r.replace("_", " ") for r in reasons),
    ]
    rows = []
    for d in docs:
        cells = [d["name"], *([d["rows"]["removed_by_handlers"]] if removed else [])]
        cells += [d["samples"]["dropped_by_reason"].get(r, 0) for r in reasons]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
    return f"<h3>Dropped, by reason</h3><table>{header}{''.join(rows)}</table>"


def _chat_table(docs: list[dict]) -> str:
    chats = [d for d in docs if d["chat"]]
    if not chats:
        return ""
    head = [
        "source",
        "trained: first turn",
        "middle",
        "last",
        "only turn",
        "reasoning",
        "tool calls",
        "context: system",
        "user",
        "assistant",
        "tool",
        "template",
    ]
    rows = []
    for d in chats:
        c = d["chat"]
        turns, ctx = c["trained_by_turn"], c["context_by_role"]
        cells = [d["name"], turns["first"], turns["middle"], turns["last"], turns["only"]]
        cells += [c["trained_reasoning"], c["trained_tool_calls"]]
        cells += [ctx["system"], ctx["user"], ctx["assistant"], ctx["tool"], ctx["template"]]
        rows.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
    return f"<h3>Chat tokens by turn and role</h3><table>{header}{''.join(rows)}</table>"


def _share_chart(share: dict[str, float]) -> str:
    width, bar, label = 640, 22, 200
    height = bar * max(len(share), 1) + 10
    items = []
    for i, (name, value) in enumerate(share.items()):
        y = 5 + i * bar
        w = (width - label - 60) * value
        items.append(
            f"<text x='{label - 6}' y='{y + 15}' text-anchor='end' font-size='12'>{_e(name[-32:])}</text>"
            f"<rect x='{label}' y='{y + 3}' width='{w:.1f}' height='{bar - 6}' fill='#3b7dd8'/>"
            f"<text x='{label + w + 4:.1f}' y='{y + 15}' font-size='12'>{100 * value:.1f}%</text>"
        )
    return (
        f"<svg class='share' width='{width}' height='{height}' "
        f"role='img' aria-label='trained-token share per source'>{''.join(items)}</svg>"
    )


def _histogram(doc: dict) -> str:
    hist = doc["lengths"]["histogram"]
    if not hist:
        return ""
    width, height, pad = 360, 160, 28
    counts, edges = hist["counts"], hist["edges"]
    top = max(counts) or 1
    step = (width - 2 * pad) / len(counts)
    bars = []
    for i, n in enumerate(counts):
        h = (height - 2 * pad) * n / top
        x, y = pad + i * step, height - pad - h
        title = f"{edges[i]:g}-{edges[i + 1]:g} tokens: {n} samples"
        bars.append(
            f"<rect x='{x:.1f}' y='{y:.1f}' width='{max(step - 1, 1):.1f}' height='{h:.1f}' fill='#5b8f29'>"
            f"<title>{_e(title)}</title></rect>"
        )
    return (
        f"<figure><svg class='histogram' width='{width}' "
        f"height='{height}' role='img' aria-label='sample lengths of {_e(doc['name'])}'>"
        f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#888'/>"
        f"{''.join(bars)}"
        f"<text x='{pad}' y='{height - 8}' font-size='11'>{edges[0]:g}</text>"
        f"<text x='{width - pad}' y='{height - 8}' font-size='11' text-anchor='end'>{edges[-1]:g}</text>"
        f"<text x='{pad}' y='14' font-size='11'>max {top} samples per bin</text></svg>"
        f"<figcaption>{_e(doc['name'])}: median {doc['lengths']['median']:g}, p95 "
        f"{doc['lengths']['p95']:g}</figcaption></figure>"
    )


def _sample(i: int, sample: dict, tokenizer: Any, processor: Any, budget: list[int]) -> str:
    ids, labels, runs = sample["input_ids"], sample["labels"], []
    refs = list(sample.get(IMAGES) or [])
    image_token = getattr(processor, "image_token", None) if refs else None
    if image_token:  # each image's run of tokens shown as the image itself, as the preview shows one marker
        ids, labels, runs = collapse_image_runs(ids, labels, processor)
    images = iter(zip(refs, runs, strict=False))
    out, used = [], 0
    for piece, trained in trained_pieces(ids, labels, tokenizer):
        if used >= _SAMPLE_CHARS:
            out.append("<span class='note'> [...]</span>")
            break
        piece = piece[: _SAMPLE_CHARS - used]
        used += len(piece)
        chunks = piece.split(image_token) if image_token else [piece]
        text = "".join(
            (_image(*next(images, ({}, 0)), budget) if k else "") + _e(c) for k, c in enumerate(chunks)
        )
        out.append(f"<mark>{text}</mark>" if trained else text)
    # images whose tokens are not in the text shown (cut by the character cap, or no processor): above it
    above = "".join(_image(ref, n, budget) for ref, n in [*images, *((r, 0) for r in refs[len(runs) :])])
    trained_count = sum(1 for t in sample["labels"] if t != IGNORE_INDEX)
    return (
        f"<p class='note'>sample {i}: {len(sample['input_ids'])} tokens, {trained_count} trained"
        f"{f', {len(refs)} image' + 's' * (len(refs) > 1) if refs else ''}</p>"
        f"{f'<div>{above}</div>' if above else ''}<div class='sample'>{''.join(out)}</div>"
    )


def _image(ref: dict, tokens: int, budget: list[int]) -> str:
    """One image of a sample as an inline thumbnail, or its text marker (unreadable, no Pillow, or the
    page's image bytes spent)."""
    name = ref.get("path") or "image bytes"
    label = f"image: {tokens} tokens" if tokens else "image"
    reason = "the page's image bytes are spent"
    if ref and budget[0] > 0:
        try:
            uri = _thumbnail(ref)
        except (UserError, OSError, ValueError) as e:  # a page shows what it can; training checks images
            reason = str(e).splitlines()[0][:200]
        else:
            if len(uri) <= budget[0]:
                budget[0] -= len(uri)
                return f'<img src="{uri}" alt="{_e(label)}" title="{_e(f"{label}: {name}")}">'
    return f"<span class='image' title='{_e(f'{name}: {reason}')}'>[{_e(label)}]</span>"


def _thumbnail(ref: dict) -> str:
    image = load_image(ref, "the audit page")  # a UserError without Pillow or for a bad file
    image.thumbnail((_THUMB_PX, _THUMB_PX))
    data = io.BytesIO()
    image.save(data, format="PNG", optimize=True)
    kind = "png"
    if data.tell() > _PNG_BYTES:
        data = io.BytesIO()
        image.save(data, format="JPEG", quality=80)
        kind = "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(data.getvalue()).decode()}"
