"""Image+text chat rows → samples for image-text models (docs/vision.md), the text chat rule extended.

Each assistant turn k is trained as the model generates it in its inference context: the processor's
chat template on ``messages[:k]`` with the generation prompt, expanded by the processor (each image
placeholder becomes the model's image tokens). :mod:`tuning.data.chat` finds the samples and the
character spans of their turns on the rendered text; here the processor expands and tokenizes each
sample, and the spans are carried over its placeholder replacements
(``return_text_replacement_offsets``) onto the expanded text's token offsets. Image tokens and every
non-assistant token are context. Templates that write no end-of-turn after an assistant message
(LLaVA-1.5) get the model's stop token appended and trained.

Images are referenced in the processed rows (a path or the encoded bytes), never stored as pixels: the
collator (:class:`VisionCollator`, in the data loader's workers) decodes them and runs the model's own
image processor. Every image is opened here once while preparing, so a missing, corrupt or oversized
file stops the job before training, naming its row; its size is read from the header first, so a
decompression bomb is refused without being decoded.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tuning.data import chat
from tuning.data.collate import PaddingCollator
from tuning.data.tokenize import IGNORE_INDEX, NOTHING_TRAINED, OK
from tuning.errors import UserError, check, excerpt

# Columns looked for, in order, when --dataset_image_field is not given (TRL's ``images``, LLaVA's ``image``).
IMAGE_COLUMNS = ("images", "image")
# The processed rows' column of image references: [{"path": str | None, "bytes": bytes | None}, ...].
IMAGES = "images"
# LLaVA/ShareGPT rows mark an image's place in the text itself.
TEXT_IMAGE_MARKER = "<image>"
IMAGE_CUT = "image_tokens_truncated"
# Refuse images with more pixels than PIL's own decompression-bomb threshold (89.5 MP), read from the
# header before decoding: far beyond what any processor keeps (Qwen2.5-VL caps at 12.8 MP).
MAX_IMAGE_PIXELS = 89_478_485


@dataclass
class VisionData:
    """What the image-text path needs: the model's processor and where the rows' images are."""

    processor: Any
    image_column: str | None = None  # None: the first of IMAGE_COLUMNS present
    base_dir: str = "."  # relative image paths are relative to the data file's folder

    def column(self, columns: Sequence[str]) -> str | None:
        if self.image_column:
            return self.image_column
        return next((c for c in IMAGE_COLUMNS if c in columns), None)


def vision_settings(settings: chat.ChatSettings, tokenizer: Any) -> chat.ChatSettings:
    """The job's chat settings with the stop token to append where a template writes none: the first
    of the model's stop ids that has a text (an added token), else the tokenizer's EOS."""
    added = tokenizer.added_tokens_decoder
    text = next((added[i].content for i in settings.stop_token_ids if i in added), tokenizer.eos_token)
    return replace(settings, append_stop=text)


def image_column_of(image_field: str | None, columns: Sequence[str]) -> str | None:
    """The image column of a dataset: the flag's (which must exist), else the first of IMAGE_COLUMNS."""
    if image_field:
        if image_field not in columns:
            raise UserError(
                f"--dataset_image_field {image_field}: no such column (columns: {list(columns)}); name the "
                "column that holds each row's images"
            )
        return image_field
    return next((c for c in IMAGE_COLUMNS if c in columns), None)


# --- image references and decoding ------------------------------------------------------------------


def image_refs(value: Any, where: str, base_dir: str) -> list[dict[str, Any]]:
    """A row's image column → references ``{"path", "bytes"}``: a path (relative ones resolved against
    ``base_dir``), ``{"bytes": ...}``/``{"path": ...}`` (how ``datasets`` stores an ``Image`` feature), a PIL
    image (kept as PNG bytes), or a list of these; a single image stands for a list of one."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    refs = []
    for item in items:
        if isinstance(item, str):
            refs.append({"path": _resolve(item, base_dir), "bytes": None})
        elif isinstance(item, Mapping) and (item.get("bytes") or item.get("path")):
            data = item.get("bytes")
            path = None if data else _resolve(str(item["path"]), base_dir)
            refs.append({"path": path, "bytes": bytes(data) if data else None})
        elif hasattr(item, "save") and hasattr(item, "size"):  # a PIL image
            buffer = io.BytesIO()
            item.save(buffer, format="PNG")
            refs.append({"path": None, "bytes": buffer.getvalue()})
        else:
            raise UserError(
                f"{where}: an image must be a file path, {{bytes}} or {{path}}, found "
                f"{type(item).__name__}: {excerpt(item)}"
            )
    return refs


def _resolve(path: str, base_dir: str) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else Path(base_dir) / p)


def load_image(ref: Mapping[str, Any], where: str) -> Any:
    """The decoded RGB image of a reference; a missing, unreadable, corrupt or oversized image is a user
    error naming ``where``. The size is checked from the header, before any pixel is decoded."""
    import warnings

    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError("image+text data needs Pillow: pip install 'tuning[vision]'") from None

    name = ref.get("path") or "its bytes"
    source = io.BytesIO(ref["bytes"]) if ref.get("bytes") else ref.get("path")
    if isinstance(source, str) and not Path(source).is_file():
        raise UserError(
            f"{where}: image file {source} does not exist; fix the path (relative paths are "
            "relative to the data file's folder)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we refuse by our own bound
            image = Image.open(source)  # reads the header only
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UserError(
                    f"{where}: image {name} is {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS} "
                    "(a decompression bomb is refused without decoding); resize it"
                )
            image.load()
            return image.convert("RGB")
    except Image.DecompressionBombError:  # PIL's own header check, past twice its threshold
        raise UserError(
            f"{where}: image {name} is over the limit of {MAX_IMAGE_PIXELS} pixels (a decompression bomb is "
            "refused without decoding); resize it"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{where}: image {name} cannot be decoded ({e}); replace the file") from None


# --- rows → conversations with image items -----------------------------------------------------------


def vision_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with user/assistant content as a list of items, as image-text templates read it: a string
    becomes text items, and LLaVA/ShareGPT ``<image>`` markers in it become ``{"type": "image"}`` items in
    place. A system message keeps its form (Mllama reads a string, Granite Vision a list)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) and message.get("role") != "system":
            items: list[dict[str, Any]] = []
            for i, piece in enumerate(content.split(TEXT_IMAGE_MARKER)):
                if i:
                    items.append({"type": "image"})
                piece = piece.strip("\n") if i or TEXT_IMAGE_MARKER in content else piece
                if piece:
                    items.append({"type": "text", "text": piece})
            message = {**message, "content": items}
        out.append(message)
    return out


def image_items(messages: Sequence[Mapping[str, Any]]) -> int:
    """How many images the messages hold (``{"type": "image"}`` items)."""
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for item in m["content"]
        if isinstance(item, Mapping) and item.get("type") in ("image", "image_url")
    )


# --- samples → tokens -------------------------------------------------------------------------------


# Per-token columns a processor returns beside input_ids and the model reads (which tokens are image
# tokens): Qwen2.5-VL's rope positions, Gemma 3's bidirectional image attention. Kept from the
# processor's own output and padded with 0 (text) by the collator.
TOKEN_TYPE_COLUMNS = ("mm_token_type_ids", "token_type_ids")


@dataclass
class _Sample:
    ids: list[int]
    labels: list[int]
    images: int  # the first n images of the row
    token_types: dict[str, list[int]] = field(default_factory=dict)


def _shift(position: int, replacements: Sequence[Mapping[str, Any]]) -> int:
    """A character position of the rendered text in the processor's expanded text."""
    moved = position
    for r in replacements:
        start, end = r["span"]
        if end <= position:
            moved += (r["new_span"][1] - r["new_span"][0]) - (end - start)
        elif start < position:
            raise UserError(
                "an image placeholder lies inside an assistant turn's trained text; images go in "
                "user messages"
            )
    return moved


def _processed(processor: Any, text: str, images: list[Any]) -> tuple[list[int], list, list, dict]:
    """The processor's ids, token offsets (in the expanded text), placeholder replacements and per-token
    type columns of ``text`` with its images; BOS added as the processor adds it at inference (when the
    template writes none)."""
    bos = processor.tokenizer.bos_token
    enc = processor(
        text=[text],
        images=images or None,
        return_text_replacement_offsets=True,
        return_offsets_mapping=True,
        add_special_tokens=not (bos and text.startswith(bos)),
    )
    replacements = (enc.get("text_replacement_offsets") or [[]])[0]
    types = {k: list(enc[k][0]) for k in TOKEN_TYPE_COLUMNS if k in enc}
    return list(enc["input_ids"][0]), [tuple(o) for o in enc["offset_mapping"][0]], replacements, types


def encode_sample(
    processor: Any, sample: chat.ChatSample, images: list[Any], image_token: str | None
) -> list[_Sample]:
    """One chat sample → token ids and labels (several samples when a turn's boundary falls inside a
    token: as the text path, each such turn gets a sample of its own, context tokens then completion)."""
    n = sample.text.count(image_token) if image_token else 0
    ids, offsets, replacements, types = _processed(processor, sample.text, images[:n])
    turns = [(_shift(a, replacements), _shift(b, replacements)) for a, b in sample.turns]
    mask, broken = chat.mask_and_check(offsets, turns)
    if broken and len(sample.turns) > 1:
        return [
            part
            for turn in sample.turns
            for part in encode_sample(
                processor, chat.ChatSample(sample.text[: turn[1]], [turn]), images, image_token
            )
        ]
    if broken:  # the context ends inside a token: its tokens, then the completion's as generated
        start, end = sample.turns[0]
        context = sample.text[:start]
        ids, _, _, types = _processed(
            processor, context, images[: context.count(image_token) if image_token else 0]
        )
        completion = chat.continuation_ids(processor.tokenizer, sample.text[start:end])
        types = {k: v + [0] * len(completion) for k, v in types.items()}  # the completion is text
        return [_Sample(ids + completion, [IGNORE_INDEX] * len(ids) + completion, n, types)]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    return [_Sample(ids, labels, n, types)]


def image_token_ids(processor: Any) -> set[int]:
    """The ids a processor's image placeholders expand into (never trained)."""
    ids = set()
    for name in ("image_token_id", "boi_token_id", "eoi_token_id"):
        value = getattr(processor, name, None)
        if isinstance(value, int):
            ids.add(value)
    token = getattr(processor, "image_token", None)
    if token:
        ids.add(processor.tokenizer.convert_tokens_to_ids(token))
    return ids


def encode_vision_conversations(
    conversations: list[chat.Conversation],
    refs: list[list[dict[str, Any]]],
    where: list[str],
    processor: Any,
    settings: chat.ChatSettings,
    max_len: int,
    chat_template: str | None,
) -> dict[str, list]:
    """Conversations with their images → ``input_ids``, ``labels``, ``images`` (references), ``status``,
    ``truncated`` and :data:`chat.SAMPLE_INFO`, one row per sample. ``chat_template``: the job's (None:
    the processor's own, else its tokenizer's)."""
    tokenizer = processor.tokenizer
    template = chat.ChatTemplate(
        tokenizer, chat_template or getattr(processor, "chat_template", None) or tokenizer.chat_template
    )
    stops = chat.stop_strings(tokenizer, settings.stop_token_ids)
    image_token = getattr(processor, "image_token", None)
    never_trained = image_token_ids(processor)
    out: dict[str, list] = {
        k: [] for k in ("input_ids", "labels", IMAGES, "status", "truncated", chat.SAMPLE_INFO)
    }
    for conversation, row_refs, loc in zip(conversations, refs, where, strict=True):
        items = image_items(conversation.messages)
        if items != len(row_refs):
            raise UserError(
                f'{loc}: the messages hold {items} image items ({{"type": "image"}} or <image>) but the image '
                f"column gives {len(row_refs)} images; give one image per item, in order"
            )
        samples, over_budget = chat.conversation_samples(conversation, template, settings, stops)
        images = [load_image(r, loc) for r in row_refs]
        parts = [p for s in samples for p in encode_sample(processor, s, images, image_token)]
        if not parts:
            _append(out, [], [], [], chat.NO_ASSISTANT, False, [0, 1, over_budget])
            continue
        for i, part in enumerate(parts):
            truncated = len(part.ids) > max_len
            ids, labels = part.ids[:max_len], part.labels[:max_len]
            check(
                all(lab == IGNORE_INDEX for t, lab in zip(ids, labels, strict=True) if t in never_trained),
                "an image token carries a label",
            )
            if truncated and any(t in never_trained for t in part.ids[max_len:]):
                status = IMAGE_CUT  # pixels would not line up with the image tokens left
            else:
                status = OK if any(t != IGNORE_INDEX for t in labels) else NOTHING_TRAINED
            info = [i, len(parts), over_budget if i == 0 else 0]
            _append(out, ids, labels, row_refs[: part.images], status, truncated, info)
            for name, values in part.token_types.items():
                out.setdefault(name, []).append(values[:max_len])
    return out


def _append(
    out: dict[str, list], ids: list, labels: list, refs: list, status: str, truncated: bool, info: list
) -> None:
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    out[IMAGES].append(refs)
    out["status"].append(status)
    out["truncated"].append(truncated)
    out[chat.SAMPLE_INFO].append(info)


# --- batches -----------------------------------------------------------------------------------------


@dataclass
class VisionCollator:
    """Padded ``input_ids``/``labels`` plus the batch's images run through the model's own processor
    (decoded here, in the data loader's workers). Image-text batches are padded, never padding-free:
    Qwen2.5-VL's 3-D rope positions and Mllama's cross-attention are built per row from the padded
    batch, so one flattened row would not equal it."""

    processor: Any
    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = PaddingCollator(self.pad_id)(features)
        for name in TOKEN_TYPE_COLUMNS:
            if features and name in features[0]:
                types = torch.zeros_like(batch["input_ids"])
                for row, f in enumerate(features):
                    types[row, : len(f[name])] = torch.as_tensor(f[name], dtype=torch.long)
                batch[name] = types
        refs = [r for f in features for r in (f.get(IMAGES) or [])]
        if not refs:
            return batch
        images = [load_image(r, "a training sample") for r in refs]
        pixels = self.processor(images=images, return_tensors="pt")
        batch.update({k: v for k, v in pixels.items() if k not in batch and k not in TOKEN_TYPE_COLUMNS})
        return batch


def collapse_image_runs(
    input_ids: Sequence[int], labels: Sequence[int], processor: Any
) -> tuple[list[int], list[int], list[int]]:
    """``input_ids``/``labels`` with each run of image tokens cut to its first token, and the runs'
    lengths (``tuning preview`` shows an image as one marker with its token count)."""
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    ids: list[int] = []
    kept: list[int] = []
    runs: list[int] = []
    for t, lab in zip(input_ids, labels, strict=True):
        if t == image_id and ids and ids[-1] == image_id:
            runs[-1] += 1
            continue
        if t == image_id:
            runs.append(1)
        ids.append(t)
        kept.append(lab)
    return ids, kept, runs


def image_markers(text: str, processor: Any, runs: Sequence[int]) -> str:
    """``text`` with the i-th image token replaced by ``[image: runs[i] tokens]``."""
    counts = iter(runs)
    return re.sub(re.escape(processor.image_token), lambda _: f"[image: {next(counts, 0)} tokens]", text)
