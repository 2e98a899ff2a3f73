"""The data audit: what a whole dataset trains, per source and in total, from counters the data stage
produces while it tokenizes (no second pass over the data), and the gates that stop a run before
training when a figure is out of bounds (docs/data.md, "Audit").

Two halves:

- per sample, inside the tokenizing ``map``: the trained tokens truncation cut (``trained_lost``) and,
  for chat rows, :data:`chat.TOKEN_ROLES`;
- after the map, :class:`SourceCounter` reads the mapped table once, in record batches (memory bounded:
  about 12 bytes per sample are kept, for the length quantiles and duplicate counts), hashing samples
  and finding empty trained texts with numpy on whole columns, into
  :class:`~tuning.data.prepare.DataStats`; :func:`build_audit` turns the stats of every source into the
  JSON document ``data_audit.json``, and :func:`check_gates` applies the thresholds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tuning.config import DataArgs
from tuning.data import chat
from tuning.data.tokenize import IGNORE_INDEX, NO_TEMPLATE, OK
from tuning.data.vision import IMAGES
from tuning.errors import UserError

logger = logging.getLogger(__name__)

AUDIT_VERSION = 1
# audit columns the tokenizing map writes next to input_ids/labels; dropped before training
COLUMNS = ("status", "truncated", "trained_lost", chat.TOKEN_ROLES)
EXAMPLES = 3  # samples per source kept for the audit page
HISTOGRAM_BINS = 20
ROLES = ("system", "user", "assistant", "tool", "template")
POSITIONS = ("first", "middle", "last", "only")

# Gates: flag → (figure, direction, default warning threshold). A figure past the flag's value stops the
# run (exit 1); without the flag, past the default it warns.
GATES: dict[str, tuple[str, str, float]] = {
    "max_dropped_fraction": ("dropped_fraction", "max", 0.1),
    "max_truncated_fraction": ("truncated_fraction", "max", 0.1),
    "min_trained_tokens_fraction": ("trained_tokens_fraction", "min", 0.02),
    "max_duplicate_fraction": ("duplicate_fraction", "max", 0.1),
    "max_empty_trained_fraction": ("empty_trained_fraction", "max", 0.05),
}


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping): a pseudo-random weight per position."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (x ^ (x >> np.uint64(31))) | np.uint64(1)


def sample_hashes(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A 64-bit hash per sample of its ids and labels (equal samples train the same thing), computed
    on the flattened columns with numpy: the sum over positions of each value times a pseudo-random odd
    weight of its position, wrapping, plus the length's. Samples must be non-empty."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    position = (np.arange(len(ids), dtype=np.int64) - np.repeat(starts, lengths)).astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = ids.astype(np.uint64) * _mix64(position * np.uint64(2))
        mixed += labels.astype(np.int64).astype(np.uint64) * _mix64(position * np.uint64(2) + np.uint64(1))
        return np.add.reduceat(mixed, starts) + _mix64(lengths.astype(np.uint64) + np.uint64(1 << 40))


class BlankTokens:
    """Which token ids show no text on their own: special and added tokens (stop tokens, ``<think>``),
    and ids that decode to whitespace or nothing. Each id is decoded once (a source has at most its
    vocabulary of distinct trained ids)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        ids = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.known: dict[int, bool] = dict.fromkeys(
            ids | set(getattr(tokenizer, "all_special_ids", []) or []), True
        )

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(ids, return_inverse=True)
        if self.tokenizer is None:
            return np.zeros(len(ids), bool)
        for i in unique.tolist():
            if i not in self.known:
                self.known[i] = not self.tokenizer.decode([i]).strip()
        return np.array([self.known[i] for i in unique.tolist()], bool)[inverse]


@dataclass
class SourceCounter:
    """Reads a source's mapped table (every sample, dropped ones too) once, batch by batch."""

    tokenizer: Any = None
    examples: int = EXAMPLES
    status: dict[str, int] = field(default_factory=dict)
    ints: dict[str, int] = field(default_factory=dict)
    roles: dict[str, int] = field(default_factory=dict)
    lengths: list[np.ndarray] = field(default_factory=list)
    hashes: list[np.ndarray] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    _rows_seen: int = 0
    _last_kept_row: int = -1
    _blank: Any = None

    def add(self, key: str, value: int) -> None:
        self.ints[key] = self.ints.get(key, 0) + int(value)

    def update(self, batch: pa.RecordBatch) -> None:
        names = batch.schema.names
        status = np.asarray(batch.column(names.index("status")).to_numpy(zero_copy_only=False))
        ok = status == OK
        for reason, count in zip(*np.unique(status[~ok], return_counts=True), strict=True):
            self.status[str(reason)] = self.status.get(str(reason), 0) + int(count)
        self.add("samples", len(status))
        self.add("kept", int(ok.sum()))
        if "trained_lost" in names:
            self.add("trained_lost", pc.sum(batch.column(names.index("trained_lost"))).as_py() or 0)
        self._count_rows(batch, names, ok)
        kept = batch.filter(pa.array(ok))
        labels = kept.column(names.index("labels"))
        lengths = pc.list_value_length(labels).to_numpy(zero_copy_only=False).astype(np.int64)
        trained_flags = pc.list_flatten(labels).to_numpy(zero_copy_only=False) != IGNORE_INDEX
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        cumulative = np.concatenate([[0], np.cumsum(trained_flags)])
        self.add("total_tokens", int(bounds[-1]))
        self.add("trained_tokens", int(cumulative[-1]))
        self.lengths.append(lengths.astype(np.int32))
        self.add("truncated", pc.sum(kept.column(names.index("truncated"))).as_py() or 0)
        if kept.num_rows:
            ids = pc.list_flatten(kept.column(names.index("input_ids"))).to_numpy(zero_copy_only=False)
            labels_flat = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
            self.hashes.append(sample_hashes(ids, labels_flat, lengths))
            if self._blank is None:
                self._blank = BlankTokens(self.tokenizer)
            sample_of = np.repeat(np.arange(kept.num_rows), lengths)[trained_flags]
            content = ~self._blank(labels_flat[trained_flags])
            per_sample = np.bincount(sample_of[content], minlength=kept.num_rows)
            self.add("empty_trained_text", int((per_sample == 0).sum()))
        if chat.TOKEN_ROLES in names:
            self._count_roles(kept.column(names.index(chat.TOKEN_ROLES)), trained_flags, lengths)
        if len(self.samples) < self.examples and kept.num_rows:
            take = kept.slice(0, self.examples - len(self.samples))
            shown = (
                "input_ids",
                "labels",
                chat.TOKEN_ROLES,
                chat.SAMPLE_INFO,
                IMAGES,
            )  # images: the page shows them
            columns = [c for c in shown if c in names]
            self.samples += take.select(columns).to_pylist()

    def _count_rows(self, batch: pa.RecordBatch, names: list[str], ok: np.ndarray) -> None:
        if chat.SAMPLE_INFO not in names:  # one sample per row
            self.add("rows", len(ok))
            self.add("rows_kept", int(ok.sum()))
            return
        flat = pc.list_flatten(batch.column(names.index(chat.SAMPLE_INFO))).to_numpy(zero_copy_only=False)
        info = flat.reshape(-1, 3)
        starts = info[:, 0] == 0
        row_ids = self._rows_seen + np.cumsum(starts) - 1  # a row's samples may span two batches
        self._rows_seen += int(starts.sum())
        self.add("rows", int(starts.sum()))
        kept_rows = np.unique(row_ids[ok])
        self.add(
            "rows_kept", len(kept_rows) - int(len(kept_rows) > 0 and kept_rows[0] == self._last_kept_row)
        )
        if len(kept_rows):
            self._last_kept_row = int(kept_rows[-1])
        split = starts & (info[:, 1] > 1)
        self.add("conversations_split", int(split.sum()))
        self.add("split_samples", int(info[split, 1].sum()))
        over = info[:, 2] > 0
        self.add("conversations_over_budget", int(over.sum()))
        self.add("turns_over_budget", int(info[over, 2].sum()))

    def _count_roles(self, column: pa.Array, trained: np.ndarray, lengths: np.ndarray) -> None:
        pieces = column.to_pylist()
        if [len(p or b"") for p in pieces] != lengths.tolist():
            return  # a later handler changed the tokens: the roles no longer line up
        codes = np.frombuffer(b"".join(p or b"" for p in pieces), dtype=np.uint8)
        for where, mask in (("trained", trained), ("context", ~trained)):
            counts = np.bincount(codes[mask] & 0b111, minlength=8)
            for role, code in chat.ROLE_CODES.items():
                self.roles[f"{where}.{role}"] = self.roles.get(f"{where}.{role}", 0) + int(counts[code])
        positions = np.bincount((codes[trained] >> 3) & 0b111, minlength=8)
        for name, code in chat.POSITION_CODES.items():
            key = f"trained.turn.{name}"
            self.roles[key] = self.roles.get(key, 0) + int(positions[code >> 3])
        self.roles["trained.turn.none"] = self.roles.get("trained.turn.none", 0) + int(positions[0])
        for key, bit in (
            ("trained.reasoning", chat.REASONING_BIT),
            ("trained.tool_calls", chat.TOOL_CALL_BIT),
        ):
            self.roles[key] = self.roles.get(key, 0) + int((codes[trained] & bit).astype(bool).sum())

    def lengths_array(self) -> np.ndarray:
        return np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)

    def hashes_array(self) -> np.ndarray:
        return np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.int64)


def duplicates(hashes: np.ndarray) -> int:
    """Samples that repeat an earlier sample exactly (ids and labels)."""
    return int(len(hashes) - len(np.unique(hashes))) if len(hashes) else 0


# --- the document ------------------------------------------------------------------------------------


@dataclass
class AuditSource:
    """One source as the audit sees it: its counts and where it ends up after splits and mixing."""

    name: str
    data_format: str
    stats: Any  # DataStats
    split: str = "train"  # train, validation, or train+validation (a data config's split)
    train_samples: int | None = None  # its samples in the training set, after split
    drawn_per_pass: int | None = None  # its samples in one pass over the mixed training set


def _fraction(part: float, whole: float) -> float:
    return round(part / whole, 6) if whole else 0.0


def _lengths(lengths: np.ndarray, max_len: int, truncated: int) -> dict[str, Any]:
    if not len(lengths):
        return {"min": 0, "median": 0, "p95": 0, "max": 0, "over_max_seq_length": 0, "histogram": None}
    edges = np.linspace(0, max(int(lengths.max()), 1), HISTOGRAM_BINS + 1)
    counts, edges = np.histogram(lengths, bins=edges)
    return {
        "min": int(lengths.min()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "over_max_seq_length": truncated,
        "over_max_seq_length_fraction": _fraction(truncated, len(lengths)),
        "histogram": {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()},
    }


def source_document(source: AuditSource, max_len: int, args: DataArgs, epochs: float | None) -> dict:
    """One source's entry of ``data_audit.json`` (keys documented in docs/data.md, "Audit")."""
    s = source.stats
    rows_read = s.rows_read or s.rows
    dropped_rows = rows_read - s.rows_kept
    samples_dropped = dict(sorted(s.dropped.items()))
    chat_part = None
    if s.token_roles:
        r = s.token_roles
        chat_part = {
            "trained_by_turn": {p: r.get(f"trained.turn.{p}", 0) for p in (*POSITIONS, "none")},
            "trained_reasoning": r.get("trained.reasoning", 0),
            "trained_tool_calls": r.get("trained.tool_calls", 0),
            "trained_by_role": {role: r.get(f"trained.{role}", 0) for role in ROLES},
            "context_by_role": {role: r.get(f"context.{role}", 0) for role in ROLES},
        }
    template = None
    if args.response_template and source.data_format in ("text", "template"):
        found = s.rows - s.dropped.get(NO_TEMPLATE, 0)
        template = {"rows_found": found, "fraction": _fraction(found, s.rows)}
    mixing = None
    if source.train_samples is not None:
        # online data mixing draws by weights learnt during training: no count is known before it
        per_pass = (
            None if source.drawn_per_pass is None else _fraction(source.drawn_per_pass, source.train_samples)
        )
        mixing = {
            "train_samples": source.train_samples,
            "drawn_per_pass": source.drawn_per_pass,
            "epochs_per_pass": per_pass,
            "effective_epochs": round(per_pass * epochs, 4)
            if epochs is not None and per_pass is not None
            else None,
        }
    return {
        "name": source.name,
        "format": source.data_format,
        "split": source.split,
        "rows": {
            "read": rows_read,
            "removed_by_handlers": max(rows_read - s.rows, 0),
            "processed": s.rows,
            "kept": s.rows_kept,
            "dropped": dropped_rows,
        },
        "samples": {
            "made": s.samples,
            "kept": s.kept,
            "dropped": sum(samples_dropped.values()),
            "dropped_by_reason": samples_dropped,
            "conversations_split": s.conversations_split,
            "samples_from_split_conversations": s.split_samples,
            "conversations_over_render_budget": s.conversations_over_budget,
        },
        "truncated": s.truncated,
        "trained_tokens_lost_to_truncation": s.trained_lost,
        "tokens": {
            "total": s.total_tokens,
            "trained": s.trained_tokens,
            "context": s.total_tokens - s.trained_tokens,
        },
        "chat": chat_part,
        "lengths": _lengths(s.lengths if s.lengths is not None else np.zeros(0), max_len, s.truncated),
        "duplicate_samples": s.duplicate_samples,
        "empty_trained_text": s.empty_trained_text,
        "response_template": template,
        "mixing": mixing,
        "figures": {
            "dropped_fraction": _fraction(dropped_rows, rows_read),
            "truncated_fraction": _fraction(s.truncated, s.kept),
            "trained_tokens_fraction": _fraction(s.trained_tokens, s.total_tokens),
            "duplicate_fraction": _fraction(s.duplicate_samples, s.kept),
            "empty_trained_fraction": _fraction(s.empty_trained_text, s.kept),
        },
    }


def build_audit(
    sources: Sequence[AuditSource], total: Any, args: DataArgs, max_len: int, epochs: float | None
) -> dict:
    """The whole ``data_audit.json`` document: per source, the total, and the gates' outcome."""
    docs = [source_document(s, max_len, args, epochs) for s in sources]
    total_source = AuditSource("total", "all", total, split="all")
    total_doc = source_document(total_source, max_len, args, epochs)
    share = {d["name"]: _fraction(d["tokens"]["trained"], total.trained_tokens) for d in docs}
    return {
        "version": AUDIT_VERSION,
        "max_seq_length": max_len,
        "num_train_epochs": epochs,
        "sources": docs,
        "total": total_doc,
        "trained_token_share": share,
        "gates": gate_results(docs, args),
    }


def gate_results(docs: list[dict], args: DataArgs) -> list[dict]:
    """Each source's figure against each gate: ``fail`` (a threshold the user set), ``warn`` (a default
    threshold) or nothing; plus the default error: a source with no non-empty trained text."""
    out = []
    for doc in docs:
        figures = doc["figures"]
        for flag, (figure, direction, default) in GATES.items():
            value = figures[figure]
            given = getattr(args, flag, None)
            limit = default if given is None else given
            past = value > limit if direction == "max" else value < limit
            kept = doc["samples"]["kept"]
            if (
                flag == "max_empty_trained_fraction"
                and given is None
                and kept == doc["empty_trained_text"] > 0
            ):
                # nothing real to learn: an error by default
                out.append(_gate(doc, flag, figure, value, 1.0, "fail", "every trained text is empty"))
                continue
            if past:
                out.append(_gate(doc, flag, figure, value, limit, "fail" if given is not None else "warn"))
    return out


def _gate(doc: dict, flag: str, figure: str, value: float, limit: float, level: str, note: str = "") -> dict:
    return {
        "source": doc["name"],
        "figure": figure,
        "value": value,
        "flag": f"--{flag}",
        "threshold": limit,
        "level": level,
        "note": note,
    }


def gate_line(gate: dict) -> str:
    """One line naming the source, the figure and the flag."""
    direction = "above" if gate["flag"].startswith("--max") else "below"
    what = f"{gate['figure']} {gate['value']:g} is {direction} {gate['flag']} {gate['threshold']:g}"
    if gate["note"]:
        what = (
            f"{gate['note']} ({gate['figure']} {gate['value']:g}); an empty answer trains only its stop "
            f"token; fix the data, or pass {gate['flag']} 1 to train anyway"
        )
    return f"data audit: source '{gate['source']}': {what}"


def check_gates(audit: dict, hint: str = "") -> None:
    """Log a warning per default threshold passed; stop with a user error at the first failing gate."""
    for gate in audit["gates"]:
        if gate["level"] == "warn":
            logger.warning("%s (a default; set the flag to stop the run)", gate_line(gate))
    for gate in audit["gates"]:
        if gate["level"] == "fail":
            raise UserError(gate_line(gate) + (f"; {hint}" if hint else ""))


def epochs_of(doc: dict[str, Any]) -> float | None:
    """How many times a source's samples are seen, as the audit's tables show it: the whole run's
    count, else one pass of the mixing (a ``--max_steps`` run has no epoch count); None unmixed."""
    mixing = doc["mixing"] or {}
    epochs = mixing.get("effective_epochs")
    return mixing.get("epochs_per_pass") if epochs is None else epochs


def audit_table(audit: dict) -> str:
    """The audit as a fixed-width table for the log."""
    header = (
        "source",
        "rows",
        "kept",
        "samples",
        "dropped",
        "truncated",
        "tokens",
        "trained",
        "trained%",
        "dup",
        "empty",
        "median",
        "p95",
        "max",
        "epochs",
    )
    lines = []
    for doc in [*audit["sources"], audit["total"]]:
        epochs = epochs_of(doc)
        lines.append(
            (
                doc["name"],
                doc["rows"]["read"],
                doc["rows"]["kept"],
                doc["samples"]["kept"],
                doc["samples"]["dropped"],
                doc["truncated"],
                doc["tokens"]["total"],
                doc["tokens"]["trained"],
                f"{100 * doc['figures']['trained_tokens_fraction']:.1f}",
                doc["duplicate_samples"],
                doc["empty_trained_text"],
                f"{doc['lengths']['median']:g}",
                f"{doc['lengths']['p95']:g}",
                doc["lengths"]["max"],
                "-" if epochs is None else f"{epochs:g}",
            )
        )
    cells = [tuple(str(c) for c in row) for row in [header, *lines]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    return "\n".join(["data audit:", *text])
