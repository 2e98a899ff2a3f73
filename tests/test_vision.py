"""Image+text chat SFT (docs/vision.md) on the real processors of ``../shared/real-processors``.

Expected ids and labels are computed here from ``apply_chat_template`` + the processor alone: turn k's
context is the template on ``messages[:k]`` with the generation prompt, processed with the images it
holds; its trained tokens are what the processor gives after the context for the completion (through
the stop token: ``<|im_end|>`` for Qwen2.5-VL; LLaVA-1.5's template writes none, so ``</s>`` from its
generation_config is appended and its separator space dropped)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tuning.config import DataArgs, ModelArgs
from tuning.data.prepare import encoding_context, prepare_path
from tuning.data.tokenize import IGNORE_INDEX
from tuning.errors import UserError

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "real-processors"
FAMILIES = ("llava-1.5", "qwen2.5-vl")
STOPS = {"llava-1.5": (2,), "qwen2.5-vl": (151645, 151643)}  # their generation_config.json


def processor_of(family: str):
    if not (REAL / family).is_dir():
        pytest.skip(f"{REAL / family} is absent: real VLM processor tests need ../shared/real-processors")
    from tuning.model.vision import load_processor

    return load_processor(ModelArgs(model_name_or_path=str(REAL / family)), DataArgs(training_data_path="x"))


_PROCESSORS: dict = {}


def proc(family: str):
    if family not in _PROCESSORS:
        _PROCESSORS[family] = processor_of(family)
    return _PROCESSORS[family]


def image(color: tuple[int, int, int], size: tuple[int, int] = (84, 56)):
    from PIL import Image

    return Image.new("RGB", size, color)


def write_png(path: Path, color, size=(84, 56)) -> str:
    image(color, size).save(path)
    return path.name


def user(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def expected(family: str, messages: list[dict], images: list) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per sample, from the template and the processor only."""
    return expected_with(proc(family), STOPS[family][0], messages, images)


def expected_with(p, stop_id: int, messages: list[dict], images: list) -> list[tuple[list[int], list[int]]]:
    stop = p.tokenizer.convert_ids_to_tokens(stop_id)

    def ids(text: str) -> list[int]:
        n = text.count(p.image_token)
        return list(p(text=[text], images=images[:n] or None)["input_ids"][0])

    turns = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        context = p.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=False)
        full = p.apply_chat_template(messages[: k + 1], tokenize=False)
        assert full.startswith(context)
        completion = full[len(context) :]
        completion = (
            completion[: completion.index(stop) + len(stop)]
            if stop in completion
            else completion.rstrip() + stop
        )
        turns.append((context, completion))
    samples: list[tuple[str, list[tuple[str, str]]]] = []
    for context, completion in turns:  # a turn joins the previous sample when it extends it
        text = context + completion
        if samples and text.startswith(samples[-1][0]):
            samples[-1] = (text, [*samples[-1][1], (context, completion)])
        else:
            samples.append((text, [(context, completion)]))
    out = []
    for text, parts in samples:
        full_ids = ids(text)
        labels = [IGNORE_INDEX] * len(full_ids)
        for context, completion in parts:
            start, end = len(ids(context)), len(ids(context + completion))
            assert full_ids[:start] == ids(context)  # the context's tokens are the sample's
            labels[start:end] = full_ids[start:end]
        out.append((full_ids, labels))
    return out


def run_prepare(tmp_path: Path, family: str, rows: list[dict], processor=None, stops=(), **data_args):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = DataArgs(training_data_path=str(data), **data_args)
    p = processor or proc(family)
    ds, fmt, stats = prepare_path(
        str(data), encoding_context(args, p.tokenizer, 4096, stops or STOPS[family], p)
    )
    return ds, stats


def check_rows(ds, want: list[tuple[list[int], list[int]]]) -> None:
    assert len(ds) == len(want)
    for row, (ids, labels) in zip(ds, want, strict=True):
        assert row["input_ids"] == ids
        assert row["labels"] == labels


@pytest.mark.parametrize("family", FAMILIES)
def test_single_turn(family, tmp_path):
    messages = [user("What color is this?", 1), assistant("Red.")]
    name = write_png(tmp_path / "red.png", (200, 10, 10))
    ds, stats = run_prepare(tmp_path, family, [{"messages": messages, "images": [name]}])
    want = expected(family, messages, [image((200, 10, 10))])
    check_rows(ds, want)
    trained = [t for t in want[0][1] if t != IGNORE_INDEX]
    assert trained[-1] == STOPS[family][0]  # the stop token is trained
    assert ds[0]["images"][0]["path"] == str(tmp_path / name)


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_with_system_prompt(family, tmp_path):
    system = {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]}
    messages = [system, user("Color?", 1), assistant("Red."), user("And the shape?"), assistant("Square.")]
    name = write_png(tmp_path / "a.png", (200, 10, 10), (56, 112))
    ds, stats = run_prepare(tmp_path, family, [{"messages": messages, "images": name}])  # a single image
    want = expected(family, messages, [image((200, 10, 10), (56, 112))])
    check_rows(ds, want)
    # Qwen's ChatML ends every turn with <|im_end|>: one sample; LLaVA's template writes no stop token,
    # so the first turn (trained with </s>) is not a prefix of the second's context: two samples
    assert len(ds) == (2 if family == "llava-1.5" else 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_image_rows(family, tmp_path):
    messages = [
        user("Compare these.", 2),
        assistant("Both red."),
        user("And this one?", 1),
        assistant("Blue."),
    ]
    colors = [((200, 10, 10), (84, 56)), ((190, 0, 0), (112, 56)), ((0, 0, 200), (56, 56))]
    buffers = []
    for color, size in colors:
        b = io.BytesIO()
        image(color, size).save(b, format="PNG")
        buffers.append({"bytes": list(b.getvalue())})  # JSON has no bytes: a list of ints, as Arrow reads it
    ds, stats = run_prepare(tmp_path, family, [{"messages": messages, "images": buffers}])
    want = expected(family, messages, [image(c, s) for c, s in colors])
    check_rows(ds, want)
    assert [len(r["images"]) for r in ds] == ([2, 3] if family == "llava-1.5" else [3])


def gemma3_processor():
    """Gemma 3's processor class, image processor (PIL) and real chat template
    (tests/vision_templates/gemma3.jinja) over a real BPE tokenizer given Gemma's control tokens: the
    Gemma tokenizer itself is not in ../shared. Its placeholder expands into text around the image tokens
    ("\\n\\n<start_of_image>" + soft tokens + "<end_of_image>\\n\\n"), which the turn spans must follow."""
    from transformers import AutoTokenizer, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    if not (REAL / "qwen2.5-vl").is_dir():
        pytest.skip(f"{REAL} is absent: the Gemma 3 check borrows the Qwen2.5 tokenizer from it")
    names = {
        "image_token": "<image_soft_token>",
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
    }
    tokenizer = AutoTokenizer.from_pretrained(REAL / "qwen2.5-vl", extra_special_tokens=names)
    controls = ["<start_of_turn>", "<end_of_turn>", *names.values()]
    tokenizer.add_special_tokens(
        {"bos_token": "<bos>", "additional_special_tokens": controls}, replace_extra_special_tokens=False
    )
    template = (Path(__file__).parent / "vision_templates" / "gemma3.jinja").read_text()
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    return Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template, image_seq_length=4
    )


def test_gemma3_template_multi_turn_with_system_and_two_images(tmp_path):
    from tuning.data import VisionCollator

    p = gemma3_processor()
    stop = p.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    messages = [system, user("Compare.", 2), assistant("Both red."), user("Sure?"), assistant("Yes.")]
    names = [write_png(tmp_path / f"{i}.png", (200, i, 0)) for i in range(2)]
    ds, _ = run_prepare(
        tmp_path, "gemma3", [{"messages": messages, "images": names}], processor=p, stops=(stop,)
    )
    want = expected_with(p, stop, messages, [image((200, i, 0)) for i in range(2)])
    check_rows(ds, want)
    assert len(ds) == 1  # <end_of_turn> closes every turn: one sample trains both
    soft = p.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert ds[0]["token_type_ids"] == [int(t == soft) for t in ds[0]["input_ids"]]  # the processor's own
    batch = VisionCollator(p, pad_id=0)(
        [
            ds[0],
            {
                **ds[0],
                "input_ids": ds[0]["input_ids"][:5],
                "labels": [IGNORE_INDEX] * 5,
                "token_type_ids": [0] * 5,
                "images": [],
            },
        ]
    )
    assert batch["pixel_values"].shape[0] == 2 and batch["token_type_ids"].shape == batch["input_ids"].shape


def smolvlm_processor():
    """SmolVLM (Idefics3 architecture): ``Idefics3Processor`` with its PIL image processor (no image
    splitting, 28 px) and SmolVLM's chat template (tests/vision_templates/smolvlm.jinja, transformers'
    ``DEFAULT_CHAT_TEMPLATE``), over a real BPE tokenizer given Idefics3's control tokens. An image
    expands to ``<fake_token_around_image><global-img>`` + image tokens + ``<fake_token_around_image>``."""
    from transformers import AutoTokenizer, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    if not (REAL / "qwen2.5-vl").is_dir():
        pytest.skip(f"{REAL} is absent: the SmolVLM check borrows the Qwen2.5 tokenizer from it")
    tokenizer = AutoTokenizer.from_pretrained(REAL / "qwen2.5-vl")
    controls = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
    tokenizer.add_special_tokens({"additional_special_tokens": controls}, replace_extra_special_tokens=False)
    template = (Path(__file__).parent / "vision_templates" / "smolvlm.jinja").read_text()
    size = {"longest_edge": 28}
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size=size, max_image_size=size)
    return Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template, image_seq_len=4
    )


def test_smolvlm_template_multi_turn_with_system_and_images(tmp_path):
    p = smolvlm_processor()
    stop = p.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}  # a content list
    messages = [system, user("Color?", 1), assistant("Red."), user("And this?", 1), assistant("Blue.")]
    names = [write_png(tmp_path / f"{i}.png", (0, i, 200)) for i in range(2)]
    ds, _ = run_prepare(
        tmp_path, "smolvlm", [{"messages": messages, "images": names}], processor=p, stops=(stop,)
    )
    check_rows(ds, expected_with(p, stop, messages, [image((0, i, 200)) for i in range(2)]))
    assert len(ds) == 1


def test_llava_sharegpt_rows(tmp_path):
    """LLaVA's own data shape: ShareGPT turns with <image> in the text and an ``image`` column."""
    name = write_png(tmp_path / "x.png", (0, 200, 0))
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "Green."},
            ],
            "image": name,
        }
    ]
    ds, _ = run_prepare(tmp_path, "llava-1.5", rows)
    check_rows(
        ds, expected("llava-1.5", [user("What is this?", 1), assistant("Green.")], [image((0, 200, 0))])
    )


def test_fms_flags_name_the_columns(tmp_path):
    """fms-hf-tuning's --dataset_text_field messages --dataset_image_field images."""
    name = write_png(tmp_path / "r.png", (200, 10, 10))
    messages = [user("Color?", 1), assistant("Red.")]
    ds, _ = run_prepare(
        tmp_path,
        "qwen2.5-vl",
        [{"msgs": messages, "pics": [name]}],
        dataset_text_field="msgs",
        dataset_image_field="pics",
    )
    check_rows(ds, expected("qwen2.5-vl", messages, [image((200, 10, 10))]))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (["missing.png"], "row 0 of .*missing.png does not exist"),
        ([], "row 0 of .*1 image items .* 0 images"),
        (["a.png", "a.png"], "row 0 of .*1 image items .* 2 images"),
        (["corrupt.png"], "row 0 of .*cannot be decoded"),
        (["bomb.png"], "row 0 of .*over the limit .*without decoding"),
    ],
)
def test_bad_images_name_the_row(tmp_path, images, message):
    write_png(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "bomb.png").write_bytes(png_header(10_000, 9_000))  # 90 MP claimed by a 57-byte file
    rows = [{"messages": [user("Color?", 1), assistant("Red.")], "images": images}]
    with pytest.raises(UserError, match=message):
        run_prepare(tmp_path, "qwen2.5-vl", rows)


def test_image_column_without_image_model(tmp_path, tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [user("hi", 1), assistant("yo")], "images": ["a.png"]}) + "\n")
    with pytest.raises(UserError, match="takes no images"):
        prepare_path(str(data), encoding_context(DataArgs(training_data_path=str(data)), tokenizer, 64, ()))


# --- the model stage and the real CLI on tiny random VLMs ------------------------------------------------


_TINY: dict = {}


def tiny_vlm(family: str, tmp_path_factory) -> Path:
    if family not in _TINY:
        if not (REAL / family).is_dir():
            pytest.skip(f"{REAL / family} is absent: real VLM processor tests need ../shared/real-processors")
        from tuning.testing.tiny_vlm import write_tiny_vlm

        _TINY[family] = write_tiny_vlm(REAL / family, tmp_path_factory.mktemp(family))
    return _TINY[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_label_only_loss_is_the_image_text_models_own(family, tmp_path_factory):
    """Why tuning/model/decisions.py lists these families in VERIFIED_IMAGE_TEXT: on a processed
    image+text batch (two rows, images expanded) the label-only loss equals the model's own."""
    import torch
    from transformers import AutoModelForImageTextToText

    from tuning.model.vision import processor_from
    from tuning.train.loss import label_only_loss

    folder = tiny_vlm(family, tmp_path_factory)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    model.config.use_cache = False
    p = processor_from(folder)
    texts = [
        p.apply_chat_template([user("What colour?", images=1), assistant(answer)], tokenize=False)
        for answer in ("red it is", "a green one")
    ]
    batch = p(
        text=texts, images=[[image((200, 10, 10))], [image((10, 200, 10))]], return_tensors="pt", padding=True
    )
    labels = batch["input_ids"].clone()
    labels[:, :-5] = IGNORE_INDEX
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    batch["labels"] = labels
    with torch.no_grad():
        own = model(**batch).loss
        ours, _ = label_only_loss(model, dict(batch), chunk_tokens=3)
    assert torch.allclose(ours, own, rtol=1e-5, atol=1e-5), (ours.item(), own.item())
    assert own.item() > 1.0  # a real loss


def color_rows(folder: Path, n: int = 4) -> Path:
    colors = [
        ("red", (200, 10, 10)),
        ("green", (10, 200, 10)),
        ("blue", (10, 10, 200)),
        ("yellow", (200, 200, 0)),
    ]
    rows = []
    for i, (name, rgb) in enumerate(colors[:n]):
        write_png(folder / f"img{i}.png", rgb, (56 + 28 * i, 56))
        rows.append(
            {
                "messages": [user("What color is this?", 1), assistant(f"It is {name}.")],
                "images": [f"img{i}.png"],
            }
        )
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_and_projector_found(family, tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    from tuning.model.vision import vision_prefixes

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm(family, tmp_path_factory))
    want = {
        "llava-1.5": {"tower": ["model.vision_tower"], "projector": ["model.multi_modal_projector"]},
        "qwen2.5-vl": {
            "tower": ["model.visual.patch_embed", "model.visual.blocks"],
            "projector": ["model.visual.merger"],
        },
    }
    assert vision_prefixes(model) == want[family]


def reload_and_generate(folder: Path) -> None:
    """The saved folder loads with AutoModelForImageTextToText and its processor, and generates."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tuning.model import processor_from

    try:
        processor = AutoProcessor.from_pretrained(folder)
    except ImportError as e:  # Qwen2.5-VL's video processor needs torchvision; the image part does not
        assert "torchvision" in str(e).lower()
        processor = processor_from(str(folder))
    model = AutoModelForImageTextToText.from_pretrained(folder)
    prompt = processor.apply_chat_template(
        [user("What color is this?", 1)], add_generation_prompt=True, tokenize=False
    )
    enc = processor(text=[prompt], images=[image((200, 10, 10))], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


@pytest.mark.slow
def test_fms_command_full_fine_tuning_saves_a_reloadable_model(tmp_path, tmp_path_factory):
    """The fms-hf-tuning command of issue 23 on a tiny Qwen2.5-VL (its flags unchanged, a save folder
    added): the language model trains, the vision tower and projector stay as they were."""
    import torch
    from safetensors.torch import load_file

    from tests.conftest import run_cli

    model = tiny_vlm("qwen2.5-vl", tmp_path_factory)
    data = color_rows(tmp_path)
    out = tmp_path / "out"
    # fms-hf-tuning's command line, unchanged, plus --save_model_dir
    args = (
        f"--model_name_or_path {model} --training_data_path {data} --output_dir {out} --num_train_epochs 5 "
    )
    args += "--per_device_train_batch_size 4 --learning_rate 1e-5 --dataset_text_field messages --dataset_image_field images"
    result = run_cli([*args.split(), "--save_model_dir", str(out / "final")], as_file=True)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = load_file(model / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    # the default --torch_dtype bfloat16: a frozen weight is its float32 original rounded to bfloat16
    changed = {k for k in before if not torch.equal(before[k].to(after[k].dtype), after[k])}
    # saved in the checkpoint layout Qwen2.5-VL ships: the language model under model., the vision tower
    # and its merger (the projector) under visual.
    assert any(k.startswith("model.layers.") for k in changed)
    assert not any("visual." in k for k in changed)  # tower and merger frozen
    assert (out / "final" / "chat_template.jinja").is_file()
    reload_and_generate(out / "final")


@pytest.mark.slow
def test_lora_on_llava_merges_into_a_reloadable_model(tmp_path, tmp_path_factory):
    import subprocess
    import sys

    from tests.conftest import REPO, run_cli

    model = tiny_vlm("llava-1.5", tmp_path_factory)
    data = color_rows(tmp_path, 2)
    out = tmp_path / "out"
    args = [
        "--model_name_or_path", str(model), "--training_data_path", str(data), "--output_dir", str(out),
        "--save_model_dir", str(out / "final"), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3", "--torch_dtype", "float32", "--peft_method", "lora", "--target_modules", "all-linear",
    ]  # fmt: skip
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    adapted = {k.split(".lora_")[0] for k in load_file(out / "final" / "adapter_model.safetensors")}
    # all-linear adapts the language model only: 2 layers x 7 projections, nothing in the tower or projector
    assert len(adapted) == 14 and all(".language_model.layers." in k for k in adapted), sorted(adapted)
    merged = tmp_path / "merged"
    cmd = [
        sys.executable,
        "-m",
        "tuning.cli",
        "merge",
        "--adapter",
        str(out / "final"),
        "--output",
        str(merged),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reload_and_generate(merged)


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(tmp_path, tmp_path_factory):
    """FSDP over 2 CPU processes (the shipped fixture, no layer class named) trains the tiny LLaVA exactly
    as one process does: same losses, same saved weights."""
    from safetensors.torch import load_file

    from tests.conftest import REPO, run_cli
    from tests.test_distributed import accelerate_launch, final_losses

    model = tiny_vlm("llava-1.5", tmp_path_factory)
    data = color_rows(tmp_path)

    def args(out: Path, per_device: int) -> list[str]:
        return [
            "--model_name_or_path", str(model), "--training_data_path", str(data), "--output_dir", str(out),
            "--save_model_dir", str(out / "final"), "--torch_dtype", "float32", "--num_train_epochs", "2",
            "--learning_rate", "1e-3", "--per_device_train_batch_size", str(per_device), "--memory_check", "warn",
        ]  # fmt: skip

    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(args(one, 4)).returncode == 0
    result = accelerate_launch([str(REPO / "tuning" / "sft_trainer.py")], args(two, 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP: parameters held per rank" in result.stderr
    assert final_losses(two) == pytest.approx(final_losses(one), abs=1e-5)
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_resume_loads_the_image_text_checkpoint(tmp_path, tmp_path_factory):
    """A run resumed from its step-1 checkpoint logs the step-2 loss of the uninterrupted run: the
    checkpoint (saved in Qwen2.5-VL's hub layout) is really loaded, not skipped key by key."""
    import shutil

    from tests.conftest import run_cli
    from tests.test_distributed import final_losses

    model = tiny_vlm("qwen2.5-vl", tmp_path_factory)
    data, out = color_rows(tmp_path), tmp_path / "out"
    args = [
        "--model_name_or_path", str(model), "--training_data_path", str(data), "--output_dir", str(out),
        "--torch_dtype", "float32", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
        "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1",
    ]  # fmt: skip
    assert run_cli(args).returncode == 0
    uninterrupted = final_losses(out)
    shutil.rmtree(out / "checkpoint-2")  # as if killed before the second save
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    assert final_losses(out) == pytest.approx(uninterrupted, abs=1e-6)


@pytest.mark.slow  # ~15 s: datasets hashes the processor for its cache fingerprint
def test_data_config_with_images(tmp_path):
    """A data config's dataset of image+text rows: the images resolved from the data file's folder."""
    folder = tmp_path / "data"
    folder.mkdir()
    name = write_png(folder / "r.png", (200, 10, 10))
    messages = [user("Color?", 1), assistant("Red.")]
    (folder / "rows.jsonl").write_text(json.dumps({"messages": messages, "images": [name]}) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text("datasets:\n  - name: pictures\n    data_paths: [data/rows.jsonl]\n")
    from tuning.data import build_datasets

    p = proc("qwen2.5-vl")
    data = build_datasets(DataArgs(data_config_path=str(config)), p.tokenizer, 4096, STOPS["qwen2.5-vl"], p)
    check_rows(data.train, expected("qwen2.5-vl", messages, [image((200, 10, 10))]))
    assert data.train[0]["images"][0]["path"] == str((folder / name).resolve())


@pytest.mark.parametrize("how", ["flags", "config file"])
def test_vision_flags_from_the_command_line_or_a_config_file(tmp_path, how):
    from tuning.config import parse_config

    values = {
        "dataset_image_field": "pics",
        "freeze_vision_tower": False,
        "freeze_multi_modal_projector": False,
    }
    base = [
        "--model_name_or_path",
        "m",
        "--training_data_path",
        "d.jsonl",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    if how == "flags":
        argv = [*base, "--dataset_image_field", "pics", "--freeze_vision_tower", "false"]
        argv += ["--freeze_multi_modal_projector", "false"]
    else:
        (tmp_path / "c.json").write_text(json.dumps(values))
        argv = [*base, "--config", str(tmp_path / "c.json")]
    config = parse_config(argv)
    assert config.data.dataset_image_field == "pics"
    assert config.model.freeze_vision_tower is False and config.model.freeze_multi_modal_projector is False


def test_text_only_rows_on_an_image_text_model(tmp_path):
    """An image-text model trained on chat rows without images: the same rule, no image tokens."""
    system = {"role": "system", "content": "Answer in one word."}  # string content works too
    messages = [
        system,
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    ds, _ = run_prepare(tmp_path, "qwen2.5-vl", [{"messages": messages}])
    check_rows(ds, expected("qwen2.5-vl", messages, []))
    assert ds[0]["images"] == []
